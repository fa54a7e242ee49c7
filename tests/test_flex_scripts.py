"""FlexVAR in the tools: sampling.py, gen_img.py and scripts/eval.sh on tiny random FlexVAR checkpoints written here
(FlexVAE: V=1024, Cvae 8, ch 32, z_channels 32; transformers of depth 1, explicit and implicit), and train.py --flex
(tests/test_train.py's toy data idea, a FlexVAE tokenizer).

What is checked: one checkpoint, two schedules, two image sizes (16 x the last side); every PNG equals the model
called directly with the official FlexVAR call form and this repository's seeding (``g_seed = seed + i``); the folder
names and recorded settings name the schedule and guidance; bad schedules and FlexVAR flags on a VAR model end in one
line; the FlexVAR tokenizer is the default for a FlexVAR model, and a missing published FlexVAR file gives the offline
download message; eval.sh's FlexVAR commands.  Training: explicit and implicit FlexVAR with random schedules drawn
from the shared seeded generator, exact resume, and the trained checkpoint sampled with other schedules (and, implicit,
fewer iterations).
"""
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_main import run_main

import gen_img
import sampling
from models import FlexVAR, build_flexvar, build_vae_var, flex_train_schedule_for
from models.checkpoint import load_vae_var
from utils import folder_sampling, sampling_utils
from utils.zoo import FLEX_TOKENIZER, VAR_TOKENIZER, flex_models

FLEX_FILES = {d: e.file for d, e in flex_models().items()}

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread, as the script subprocesses (OMP_NUM_THREADS=1): on CPU float results depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """FLEX_TOKENIZER ({'model': state dict}), flex.pth (explicit FlexVAR, depth 1), flex_implicit.pth (1 pre + 1
    implicit + 1 post block), random weights made to depend on the class; and
    VAR's tokenizer and a VAR model, for the mismatch messages."""
    d = tmp_path_factory.mktemp('flex_ckpts')
    for implicit in (False, True):
        torch.manual_seed(0)
        vae, var = build_flexvar(V=1024, Cvae=8, ch=32, z_channels=32, num_classes=NUM_CLASSES, depth=1,
                                 patch_nums=(1, 2, 3, 4), use_implicit=implicit, pre_depth=1, post_depth=1)
        with torch.no_grad():       # a fresh init barely depends on the class: make the class and the blocks matter
            for b in var.all_blocks():
                b.ada_lin[-1].weight.normal_(0, 0.05)
            var.class_emb.weight.mul_(20)
            var.head.weight.normal_(0, 0.3)
        torch.save(var.state_dict(), d / ('flex_implicit.pth' if implicit else 'flex.pth'))
        if not implicit:
            torch.save({'model': vae.state_dict()}, d / FLEX_TOKENIZER)
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, num_classes=NUM_CLASSES,
                             depth=1)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    return d


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def direct(var, vae, c, g_seed, B, schedule, cfg=1.5, top_k=900, top_p=0.96, max_pn=16, llamagen=False, **iters):
    """The model called directly, in the official FlexVAR call form (``vqvae=``, ``infer_patch_nums=``), with
    ``g_seed`` as sampling.py / gen_img.py seed it; fp32 on CPU, converted as the official VAR scripts (x 255,
    uint8)."""
    with torch.inference_mode():
        img = var.autoregressive_infer_cfg(vqvae=vae, B=B, label_B=torch.tensor([c] * B), infer_patch_nums=schedule,
                                           cfg=cfg, top_k=top_k, top_p=top_p, g_seed=g_seed, more_smooth=False,
                                           max_pn=max_pn, used_llamagen_cfg=llamagen, **iters)
        return img.permute(0, 2, 3, 1).mul_(255).cpu().numpy().astype(np.uint8)


def script_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env.update(extra)
    return env


# ================================ sampling.py =========================================================================
def test_sampling_two_schedules_from_one_checkpoint(ckpts, tmp_path):
    """1_2_4 (64 px) and 1_2_3_4_6 (96 px), official seeding, folders and recorded settings naming the schedule."""
    vae, var = load_vae_var(str(ckpts / FLEX_TOKENIZER), str(ckpts / 'flex.pth'))
    assert isinstance(var, FlexVAR)
    for pn, side in (('1_2_4', 64), ('1_2_3_4_6', 96)):
        run_main(sampling.main, [
            '--ckpt_path', str(ckpts / 'flex.pth'), '--vae_ckpt', str(ckpts / FLEX_TOKENIZER), '--infer_pn', pn,
            '--cfg', '2.5', '--top_p', '0.95', '--sample_dir', str(tmp_path), '--num_classes', '2', '--per_class', '3',
            '--batch_size', '2'])
        folder = tmp_path / f'flexvar-d1-flex.pth-pn{pn}-cfg-2.5-maxpn-16-seed-1'
        names = sorted(p.name for p in folder.glob('*.png'))
        assert names == [f'{k:06d}.png' for k in range(6)]
        pngs = np.stack([read_png(folder / n) for n in names])
        with np.load(str(folder) + '.npz') as z:
            assert z['arr_0'].shape == (6, side, side, 3) and np.array_equal(z['arr_0'], pngs)
        schedule = tuple(map(int, pn.split('_')))
        # class c, batch i (2 images, then 1) = the model with g_seed = 1 + i
        want = np.concatenate([direct(var, vae, c, 1 + i, n, schedule, cfg=2.5, top_p=0.95)
                               for c in range(2) for i, n in ((0, 2), (1, 1))])
        assert np.array_equal(pngs, want)
        for a, b in ((0, 1), (0, 2), (0, 3)):      # other image of the batch, other seed, other class
            assert not np.array_equal(pngs[a], pngs[b]), (a, b)
        record = json.loads((folder / folder_sampling.CONFIG_NAME).read_text())
        assert record['infer_patch_nums'] == list(schedule) and record['max_pn'] == 16
        assert record['used_llamagen_cfg'] is False and record['vae_ckpt'] == FLEX_TOKENIZER
        assert 'iter_left' not in record           # an explicit backbone ignores the iteration knob


def test_sampling_implicit_flexvar_with_guidance_flags_and_the_default_tokenizer(ckpts, tmp_path, monkeypatch):
    """The default schedule (the official 1_2_..._16: 256 px) with LlamaGen's guidance, max_pn 4 (greedy, full cfg
    above it) and 3 -> 1 implicit iterations; --vae_ckpt left out: ckpts/FLEX_TOKENIZER, found by the model's kind."""
    (tmp_path / 'ckpts').mkdir()
    shutil.copy(ckpts / FLEX_TOKENIZER, tmp_path / 'ckpts' / FLEX_TOKENIZER)
    monkeypatch.chdir(tmp_path)
    args = sampling.parse_args(['--ckpt_path', str(ckpts / 'flex_implicit.pth'), '--use_implicit', '--sample_dir', 's',
                                '--num_classes', '1', '--per_class', '1', '--used_llamagen_cfg', '--max_pn', '4',
                                '--iter_left', '3', '--iter_right', '1', '--cfg', '3'])
    sampling.sample(args)
    assert args.vae_ckpt == f'ckpts/{FLEX_TOKENIZER}'
    folder = tmp_path / 's' / ('flexvar-implicit-d1-flex_implicit.pth-pn1_2_3_4_5_6_8_10_13_16-cfg-3.0-maxpn-4-'
                               'llamagen-seed-1')
    record = json.loads((folder / folder_sampling.CONFIG_NAME).read_text())
    assert (record['infer_patch_nums'], record['max_pn'], record['used_llamagen_cfg']) == \
        ([1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 4, True)
    assert (record['iter_left'], record['iter_right']) == (3, 1)
    vae, var = load_vae_var(f'ckpts/{FLEX_TOKENIZER}', str(ckpts / 'flex_implicit.pth'))
    want = direct(var, vae, 0, 1, 1, None, cfg=3.0, max_pn=4, llamagen=True, iter_left=3, iter_right=1)
    assert want.shape == (1, 256, 256, 3) and np.array_equal(read_png(folder / '000000.png'), want[0])


# ================================ gen_img.py ==========================================================================
def test_gen_img_two_schedules_and_resolutions(ckpts, tmp_path):
    vae, var = load_vae_var(str(ckpts / FLEX_TOKENIZER), str(ckpts / 'flex.pth'))
    for pn, side in (('1_2_3_4', 64), ('1_2_4_8', 128)):
        run_main(gen_img.main, ['--var_ckpt', str(ckpts / 'flex.pth'), '--vae_ckpt',
                                         str(ckpts / FLEX_TOKENIZER), '--infer_patch_nums', pn, '--class_label', '0',
                                         '2', '--seeds', '3', '4', '--save_grid', '--nrow', '2', '--output_dir',
                                         str(tmp_path)])
        out = tmp_path / f'flex-pn{pn}'
        singles = [f'class{c}_seed{s}.png' for c in (0, 2) for s in (3, 4)]
        assert sorted(p.name for p in out.glob('*.png')) == sorted(singles + ['class0_2_seeds3_4_grid.png'])
        schedule = tuple(map(int, pn.split('_')))
        for name in singles:
            c, s = map(int, re.findall(r'\d+', name))
            img = read_png(out / name)
            assert img.shape == (side, side, 3) and np.array_equal(img, direct(var, vae, c, s, 1, schedule)[0])
        assert read_png(out / 'class0_2_seeds3_4_grid.png').shape == (2 + 2 * (side + 2), 2 + 2 * (side + 2), 3)


# ================================ one-line errors =====================================================================
BAD_SCHEDULES = [
    (['--infer_pn', '2_4_8'], '--infer_pn 2_4_8 must be token-map sides, strictly increasing from 1'),
    (['--infer_pn', '1_4_4'], '--infer_pn 1_4_4 must be'),
    (['--infer_pn', '1_8_4'], '--infer_pn 1_8_4 must be'),
    (['--infer_pn', '1,2,4'], "--infer_pn 1,2,4 must be token-map sides, strictly increasing from 1, like "
                              "1_2_3_4_5_6_8_10_13_16, or '256' / '512'"),
    (['--infer_pn', '384'], '--infer_pn 384 must be'),
    (['--max_pn', '0'], '--max_pn 0 must be >= 1'),
]


@pytest.mark.parametrize('script', ['sampling.py', 'gen_img.py'])
@pytest.mark.parametrize('argv,expected', BAD_SCHEDULES)
def test_bad_schedules_end_in_one_line_before_loading(ckpts, tmp_path, monkeypatch, capsys, script, argv, expected):
    mod = sampling if script == 'sampling.py' else gen_img
    for name in ('setup_device', 'load_models' if mod is sampling else 'load_chosen'):
        monkeypatch.setattr(mod, name, lambda *a, name=name: pytest.fail(f'{name} called for a bad flag'))
    out = tmp_path / 'out'
    common = ['--vae_ckpt', str(ckpts / FLEX_TOKENIZER)] + (
        ['--ckpt_path', str(ckpts / 'flex.pth'), '--sample_dir', str(out), '--num_classes', '1'] if mod is sampling
        else ['--var_ckpt', str(ckpts / 'flex.pth'), '--output_dir', str(out)])
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, common + argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f'{script}: error: ') and expected in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_bad_schedule_from_the_command_line_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'gen_img.py'), '--infer_pn', '1_3_2'], cwd=tmp_path,
                       env=script_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        "gen_img.py: error: --infer_pn 1_3_2 must be token-map sides, strictly increasing from 1, like "
        "1_2_3_4_5_6_8_10_13_16, or '256' / '512'"), r.stderr
    assert not list(tmp_path.iterdir())


def test_flexvar_flags_on_a_var_model_and_mismatched_tokenizers(ckpts, tmp_path, capsys):
    base = ['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir',
            str(tmp_path / 's'), '--num_classes', '1', '--per_class', '1']
    for extra, want in ((['--infer_pn', '1_2_4'], '--infer_pn is a FlexVAR flag, but'),
                        (['--max_pn', '8', '--used_llamagen_cfg'], '--max_pn --used_llamagen_cfg are FlexVAR flags')):
        with pytest.raises(SystemExit) as e:
            run_main(sampling.main, base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and 'holds VAR-d1, whose scales are fixed' in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / 's').exists()
    # a FlexVAR model with VAR's tokenizer (and the reverse): one sentence naming --vae_ckpt
    flex_want = "needs FlexVAR's tokenizer (a FlexVAE), but the tokenizer given is VAR's multi-scale VQVAE: pass "
    for var_ckpt, vae_ckpt, want in (('flex.pth', 'vae.pth', flex_want + FLEX_TOKENIZER),
                                     ('var.pth', FLEX_TOKENIZER, "needs VAR's multi-scale VQVAE")):
        with pytest.raises(SystemExit) as e:
            run_main(gen_img.main, ['--var_ckpt', str(ckpts / var_ckpt), '--vae_ckpt', str(ckpts / vae_ckpt),
                                             '--output_dir', str(tmp_path / 'g')])
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and '--vae_ckpt' in err and len(err.strip().splitlines()) == 1


def test_missing_published_flexvar_files_give_the_download_message(tmp_path):
    """Offline, a published FlexVAR file at its default place: the one-line message with its URL (the model first;
    with the model there, its tokenizer FLEX_TOKENIZER, chosen by the model's kind).  The working directory has its own
    ckpts/ folder (without one, ckpts/<file> is the repository's)."""
    (tmp_path / 'ckpts').mkdir()
    for name in (FLEX_FILES[16], FLEX_TOKENIZER):
        r = subprocess.run([sys.executable, str(REPO / 'gen_img.py'), '--var_ckpt', f'ckpts/{FLEX_FILES[16]}'],
                           cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
        url = f'https://huggingface.co/jiaosiyu1999/FlexVAR/resolve/main/{name}'
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
        assert f"'ckpts/{name}'" in r.stderr and f'wget -O ckpts/{name} {url}' in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'gen_images').exists()
        (tmp_path / 'ckpts').mkdir(exist_ok=True)
        torch.manual_seed(0)
        _, var = build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=1, device='meta')
        torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in var.state_dict().items()},
                   tmp_path / 'ckpts' / FLEX_FILES[16])


# ================================ scripts/eval.sh =====================================================================
def test_eval_sh_flexvar_commands_name_the_folder_sampling_py_writes(tmp_path):
    """FLEXVAR=d{16,20,24} [INFER_PN=...] [CFG=...] with a stand-in interpreter: the sampling.py command has the
    official evaluation settings, and the npz given to the evaluator is the one that command writes."""
    log, stub, ref = tmp_path / 'calls.txt', tmp_path / 'python', tmp_path / 'ref.npz'
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    ref.write_bytes(b'stand-in')
    cases = [({'FLEXVAR': 'd16'}, 16, FLEX_FILES[16], '1_2_3_4_5_6_8_10_13_16', '2.5'),
             ({'FLEXVAR': 'd20', 'INFER_PN': '1_2_3_4_5_6_7_8_9_10_12_14_16'}, 20, FLEX_FILES[20],
              '1_2_3_4_5_6_7_8_9_10_12_14_16', '2.5'),
             ({'FLEXVAR': 'd24', 'INFER_PN': '512'}, 24, FLEX_FILES[24],
              '1_2_3_4_5_6_7_8_9_10_12_14_16_23_32', '3.0'),
             ({'FLEXVAR': 'd24', 'INFER_PN': '1-2-04-8', 'CFG': '4'}, 24, FLEX_FILES[24], '1_2_4_8', '4.0'),
             ({'FLEXVAR': 'd16', 'CFG': '2.50'}, 16, FLEX_FILES[16], '1_2_3_4_5_6_8_10_13_16', '2.5')]
    for env_extra, depth, ckpt, pn, cfg in cases:
        log.unlink(missing_ok=True)
        env = dict(os.environ, PYTHON=str(stub), REF_BATCH=str(ref), **env_extra)
        r = subprocess.run(['bash', str(REPO / 'scripts' / 'eval.sh')], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        sample_line, eval_line = log.read_text().splitlines()
        argv = sample_line.split()
        assert argv[0] == 'sampling.py'
        assert ' '.join(argv) == (f'sampling.py --ckpt_path ckpts/{ckpt} --vae_ckpt ckpts/{FLEX_TOKENIZER} '
                                  f'--depth {depth} --infer_pn {pn} --cfg {cfg} --top_k 900 --top_p 0.95 --max_pn 16 '
                                  f'--sample_dir samples')
        args = sampling.parse_args(argv[1:])
        sampling.check_sampling_args(args)
        kw = sampling_utils.sampler_kwargs(args)
        folder = os.path.join(args.sample_dir, sampling.folder_name(args, depth, kw))
        assert eval_line == f'evaluator.py {ref} {folder}.npz'
    # the 512 px schedule is evaluated against the 512 px reference batch by default; bad settings: one line
    env = {k: v for k, v in os.environ.items() if k != 'REF_BATCH'}
    r = subprocess.run(['bash', str(REPO / 'scripts' / 'eval.sh')], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(env, PYTHON=str(stub), FLEXVAR='d20', INFER_PN='512'), timeout=60)
    assert r.returncode == 1 and 'VIRTUAL_imagenet512.npz not found' in r.stderr and 'imagenet/512/' in r.stderr
    for bad, want in (({'FLEXVAR': 'd30'}, 'FLEXVAR must be d16, d20 or d24'),
                      ({'FLEXVAR': 'd16', 'INFER_PN': '1,2'}, 'INFER_PN must be'),
                      ({'FLEXVAR': 'd16', 'CFG': 'high'}, 'CFG must be a number')):
        r = subprocess.run(['bash', str(REPO / 'scripts' / 'eval.sh')], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(os.environ, PYTHON=str(stub), REF_BATCH=str(ref), **bad), timeout=60)
        assert r.returncode == 1 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ================================ train.py --flex =====================================================================
TRAIN_PN = (1, 2, 3, 4)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """3 colour classes of 64 px PNGs (4 train / 1 val each), FlexVAR's tokenizer (FLEX_TOKENIZER: V=64, Cvae 8, ch 32,
    z_channels 32) and VAR's (vae.pth), random weights."""
    root = tmp_path_factory.mktemp('flex_toy')
    rng = np.random.default_rng(0)
    for split, n in (('train', 4), ('val', 1)):
        for c, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 230)]):
            d = root / 'data' / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
                a[:, ::8 * (c + 1)] = 0
                Image.fromarray(a).save(d / f'{i}.png')
    torch.manual_seed(0)
    vae, _ = build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=1, patch_nums=TRAIN_PN)
    torch.save({'model': vae.state_dict()}, root / FLEX_TOKENIZER)
    var_vae, _ = build_vae_var(device='cpu', patch_nums=TRAIN_PN, V=64, Cvae=8, ch=32, num_classes=3, depth=1)
    torch.save(var_vae.state_dict(), root / 'vae.pth')
    return root


def flex_args(toy, out, *extra, ep=1):
    return ['--flex', '--data_path', str(toy / 'data'), '--vae_ckpt', str(toy / FLEX_TOKENIZER), '--pn', '1_2_3_4',
            '--depth', '2', '--bs', '2', '--ep', str(ep), '--seed', '0', '--log_freq', '1', '--save_freq', '1',
            '--workers', '0', '--local_out_dir_path', str(out), *map(str, extra)]


def run_train(args, nproc=1, timeout=300, faults=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', VIAR_TEST_FAULTS=faults or '')
    if nproc == 1:
        cmd = [sys.executable, 'train.py', *args]
    else:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}',
               'train.py', *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_events(tb_dir):
    """Events of every event file in ``tb_dir`` (by name = by start time), parsed without TensorFlow."""
    import struct

    from tensorboard.compat.proto.event_pb2 import Event
    files = []
    for f in sorted(Path(tb_dir).glob('events.out.tfevents.*')):
        data, pos, events = f.read_bytes(), 0, []
        while pos + 12 <= len(data):
            n, = struct.unpack('<Q', data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
        files.append(events)
    return files


def scalars(events, tag):
    return {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == tag}


def replay(n, implicit, seed=0):
    """The (schedule, (n0, n1)) of the first ``n`` iterations: the draws of one random.Random(seed) shared by the
    ranks -- the schedule (flex_train_schedule_for of --pn), then an implicit backbone's (n0, n1) (U{0..10},
    U{1..12})."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        pns = flex_train_schedule_for(rng, TRAIN_PN)
        out.append((pns, (rng.randint(0, 10), rng.randint(1, 12)) if implicit else None))
    return out


def logged_steps(stdout):
    """(schedule, (n0, n1) or None) of every logged iteration, from the console lines."""
    steps = []
    for line in stdout.splitlines():
        m = re.search(r'\[ep .*?(?:n0/n1 (\d+)/(\d+))?  pn ([\d_]+)$', line)
        if m:
            steps.append(([int(x) for x in m.group(3).split('_')],
                          (int(m.group(1)), int(m.group(2))) if m.group(1) else None))
    return steps


def strip_times(records):
    return [{k: v for k, v in rec.items() if k not in ('elapsed_s', 'remain_time')} for rec in records]


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def test_training_schedule_rule_for_any_scales():
    """At the official scales the official rule, draw for draw; at others its carried-over form: strictly increasing,
    the same first side, never more tokens than --pn, the first two sides kept."""
    from models import flex_train_schedule
    a, b = random.Random(3), random.Random(3)
    assert [flex_train_schedule_for(a) for _ in range(500)] == [flex_train_schedule(b) for _ in range(500)]
    assert a.random() == b.random()                                     # the same number of draws
    for pn in (TRAIN_PN, (1, 2, 4), (1, 2), (1, 2, 3, 8), (1, 2, 3, 4, 6, 8, 11, 14, 18, 24, 32)):
        rng, budget = random.Random(0), sum(p * p for p in pn)
        draws = [flex_train_schedule_for(rng, pn) for _ in range(2000)]
        for s in draws:
            assert s[:2] == list(pn[:2]) and all(x < y for x, y in zip(s, s[1:])) and sum(p * p for p in s) <= budget
            assert set(s) <= set(range(pn[0], pn[-1] + 1))
        if len(pn) >= 4:
            assert len({tuple(s) for s in draws}) > 1 and list(pn) in draws
    counts = [flex_train_schedule_for(r, TRAIN_PN) for r in [random.Random(0)] for _ in range(4000)]
    assert {tuple(s) for s in counts} == {(1, 2, 3, 4), (1, 2, 4)}
    assert 0.08 < sum(s == [1, 2, 4] for s in counts) / len(counts) < 0.12     # the 10 % scale drop


def test_flex_training_draws_schedules_and_samples_two_schedules(toy, tmp_path):
    """Explicit FlexVAR: every iteration's schedule is the seeded draw (the tail loss and per-scale metrics follow
    it); the checkpoint is a FlexVAR one that gen_img samples at 64 and 128 px, equal to the model called directly."""
    out = tmp_path / 'explicit'
    r = run_train(flex_args(toy, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[model] FlexVAR-d2' in r.stdout
    want = replay(6, implicit=False)
    assert len({tuple(p) for p, _ in want}) >= 2                # the seed draws more than one schedule
    assert logged_steps(r.stdout) == want
    (tb,) = list(out.glob('tb-*'))
    assert tb.name.startswith('tb-VARd2__pn1_2_3_4') and tb.name.endswith('__flexvar')
    (events,) = read_events(tb)
    assert scalars(events, 'AR_flex/tokens') == {i: float(sum(p * p for p in pns)) for i, (pns, _) in enumerate(want)}
    assert scalars(events, 'AR_flex/scales') == {i: float(len(pns)) for i, (pns, _) in enumerate(want)}
    # per-scale metrics: a scale is logged at the iterations whose schedule holds it (tags by resolution)
    assert sorted(scalars(events, 'AR_iter_scale/L_48')) == [i for i, (pns, _) in enumerate(want) if 3 in pns]
    assert sorted(scalars(events, 'AR_iter_scale/acc_64')) == list(range(6))
    assert [rec['kind'] for rec in log_lines(out)] == ['val', 'epoch'] and math.isfinite(log_lines(out)[0]['vL_tail'])

    ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['trainer']['config']['flex'] is True and ckpt['args']['flex'] is True
    vae, var = load_vae_var(str(toy / FLEX_TOKENIZER), str(out / 'ar-ckpt-last.pth'), expect={'flex': True})
    assert isinstance(var, FlexVAR) and not var.backbone.is_implicit
    for pn, side in (('1_2_3_4', 64), ('1_2_4_8', 128)):
        run_main(gen_img.main, ['--var_ckpt', str(out / 'ar-ckpt-last.pth'), '--vae_ckpt',
                                         str(toy / FLEX_TOKENIZER), '--infer_pn', pn, '--class_label', '1',
                                         '--seeds', '5', '--top_k', '10', '--output_dir', str(tmp_path / 'g')])
        img = read_png(tmp_path / 'g' / f'ar-ckpt-last-pn{pn}' / 'class1_seed5.png')
        assert img.shape == (side, side, 3)
        assert np.array_equal(img, direct(var, vae, 1, 5, 1, tuple(map(int, pn.split('_'))), top_k=10)[0])


@pytest.fixture(scope='module')
def implicit_run(toy, tmp_path_factory):
    """The run the interrupted one must reproduce exactly: implicit FlexVAR, 2 epochs of 6 iterations."""
    out = tmp_path_factory.mktemp('flex_implicit') / 'A'
    r = run_train(flex_args(toy, out, '--use_implicit', '--p_depth', '1', '--hflip', ep=2))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_implicit_flex_training_resumes_exactly(toy, tmp_path, implicit_run):
    A, ra = implicit_run
    assert '[model] FlexVIAR-d2 (1 pre + 1 implicit + 1 post blocks)' in ra.stdout
    assert logged_steps(ra.stdout) == replay(12, implicit=True)     # the schedule, then (n0, n1), per iteration
    B = tmp_path / 'B'
    cmd = flex_args(toy, B, '--use_implicit', '--p_depth', '1', '--hflip', ep=2)
    r1 = run_train(cmd, faults='kill_at=7')             # SIGTERM during iteration 7: saved after it
    assert r1.returncode == 143 and 'rerun the same command' in r1.stdout, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = run_train(cmd)
    assert r2.returncode == 0 and '[resume]' in r2.stdout, r2.stderr[-3000:]
    assert logged_steps(r1.stdout) + logged_steps(r2.stdout) == replay(12, implicit=True)
    # per-epoch records, final weights and optimizer state identical to the uninterrupted run
    assert strip_times(log_lines(B)) == strip_times(log_lines(A))
    ca, cb = (torch.load(o / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True) for o in (A, B))
    assert all(torch.equal(v, cb['trainer']['var_wo_ddp'][k]) for k, v in ca['trainer']['var_wo_ddp'].items())
    sa, sb = ca['trainer']['var_opt']['optimizer']['state'], cb['trainer']['var_opt']['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)
    (ev_a,) = read_events(next(A.glob('tb-*')))
    first, second = read_events(next(B.glob('tb-*')))
    for tag in ('AR_iter_loss/train_loss', 'AR_flex/tokens', 'AR_implicit/n1_with_grad'):
        want = scalars(ev_a, tag)
        got = {**scalars(first, tag), **scalars(second, tag)}
        assert sorted(want) == list(range(12)) and got == want, tag


def test_implicit_flexvar_samples_with_fewer_steps_and_fewer_iterations(toy, tmp_path, implicit_run):
    """Trained on 1_2_3_4 (4 steps), sampled with 1_2_4 (3 steps) and 2 -> 1 implicit iterations (2, 1, 1) from the
    same checkpoint: gen_img's image is the model's, and the trace shows the iterations run."""
    A, _ = implicit_run
    ckpt = A / 'ar-ckpt-last.pth'
    vae, var = load_vae_var(str(toy / FLEX_TOKENIZER), str(ckpt), expect={'flex': True, 'use_implicit': True})
    full, few = {}, {}
    with torch.inference_mode():
        var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([2]), infer_patch_nums=TRAIN_PN, g_seed=7, top_k=10,
                                     trace=full)
        var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([2]), infer_patch_nums=(1, 2, 4), g_seed=7, top_k=10,
                                     iter_left=2, iter_right=1, trace=few)
    assert full['iters'] == [10, 10, 10, 10] and few['iters'] == [2, 1, 1]
    run_main(gen_img.main, ['--var_ckpt', str(ckpt), '--vae_ckpt', str(toy / FLEX_TOKENIZER), '--use_implicit',
                                     '--infer_pn', '1_2_4', '--iter_left', '2', '--iter_right', '1', '--class_label',
                                     '2', '--seeds', '7', '--top_k', '10', '--output_dir', str(tmp_path)])
    img = read_png(tmp_path / 'ar-ckpt-last-pn1_2_4' / 'class2_seed7.png')
    assert img.shape == (64, 64, 3)
    assert np.array_equal(img, direct(var, vae, 2, 7, 1, (1, 2, 4), top_k=10, iter_left=2, iter_right=1)[0])


def test_a_training_checkpoint_samples_the_schedule_it_was_trained_on_by_default(toy, tmp_path, implicit_run):
    """Without --infer_pn a train.py --flex checkpoint samples its own --pn (1_2_3_4: 64 px), not the official 10
    scales: the loaders' default schedule, sampling.py's folder name and record, gen_img.py's folder; the same weights
    as a bare state dict (as the published files are) keep the official default."""
    from models.checkpoint import load_var, trained_schedule
    from models.flexvae import FLEX_PATCH_NUMS
    A, _ = implicit_run
    ckpt, tok = A / 'ar-ckpt-last.pth', str(toy / FLEX_TOKENIZER)
    vae, var = load_vae_var(tok, str(ckpt))
    assert var.patch_nums == TRAIN_PN and vae.v_patch_nums == TRAIN_PN
    assert load_var(str(ckpt), vae).patch_nums == TRAIN_PN
    assert sampling_utils.sampler_kwargs(sampling.parse_args([]), var)['infer_patch_nums'] == TRAIN_PN
    run_main(sampling.main, ['--ckpt_path', str(ckpt), '--vae_ckpt', tok, '--use_implicit', '--sample_dir',
                                       str(tmp_path / 's'), '--num_classes', '1', '--per_class', '1', '--top_k', '10',
                                       '--iter_left', '2', '--iter_right', '1'])
    folder = tmp_path / 's' / 'flexvar-implicit-d2-ar-ckpt-last.pth-pn1_2_3_4-cfg-1.5-maxpn-16-seed-1'
    assert json.loads((folder / folder_sampling.CONFIG_NAME).read_text())['infer_patch_nums'] == list(TRAIN_PN)
    want = direct(var, vae, 0, 1, 1, TRAIN_PN, top_k=10, iter_left=2, iter_right=1)
    assert want.shape == (1, 64, 64, 3) and np.array_equal(read_png(folder / '000000.png'), want[0])
    run_main(gen_img.main, ['--var_ckpt', str(ckpt), '--vae_ckpt', tok, '--use_implicit', '--class_label', '0',
                                     '--seeds', '1', '--top_k', '10', '--iter_left', '2', '--iter_right', '1',
                                     '--output_dir', str(tmp_path / 'g')])
    assert np.array_equal(read_png(tmp_path / 'g' / 'ar-ckpt-last-pn1_2_3_4' / 'class0_seed1.png'), want[0])
    # the published convention: a bare state dict has no record of its training, its default is the official one
    torch.save(torch.load(ckpt, map_location='cpu', weights_only=True)['trainer']['var_wo_ddp'], tmp_path / 'bare.pth')
    assert load_vae_var(tok, str(tmp_path / 'bare.pth'))[1].patch_nums == FLEX_PATCH_NUMS
    # what the record may hold: the config's scales first, then the flags'; anything else is no schedule
    both = {'trainer': {'config': {'patch_nums': [1, 2, 4]}}, 'args': {'patch_nums': [1, 2]}}
    assert trained_schedule(both) == (1, 2, 4)
    assert trained_schedule({'trainer': {}, 'args': {'patch_nums': [1, 2, 3]}}) == (1, 2, 3)
    for bad in ({'trainer': {'config': {'patch_nums': [1, 3, 2]}}}, {'trainer': {'config': {'patch_nums': '1_2'}}},
                {'trainer': {'config': {}}, 'args': {'patch_nums': [0, 1]}}, {'model': {}}, None):
        assert trained_schedule(bad) is None, bad


def test_flex_training_under_ddp_shares_the_schedule(toy, tmp_path):
    """Two ranks (torchrun, gloo): the same schedule on both (their metrics are all-reduced per scale) and the same
    parameters at the end."""
    out = tmp_path / 'ddp'
    r = run_train(flex_args(toy, out, '--use_implicit', '--p_depth', '1', '--bs', '4'), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert logged_steps((out / 'stdout.txt').read_text()) == replay(3, implicit=True)
    ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    fps = ckpt['resume']['rank_fingerprints']
    assert fps.shape[0] == 2 and torch.equal(fps[0], fps[1])


def test_flex_training_refuses_the_wrong_tokenizer_or_a_changed_flag(toy, tmp_path, implicit_run, capsys):
    def run(argv):
        r = run_train(argv)
        return r.returncode, r.stdout, r.stderr
    argv = flex_args(toy, tmp_path / 'a')
    argv[argv.index('--vae_ckpt') + 1] = str(toy / 'vae.pth')
    rc, out, err = run(argv)
    assert rc == 1 and "--flex trains FlexVAR on FlexVAR's tokenizer" in err and f'pass {FLEX_TOKENIZER}' in err, err
    assert err.count('\n') == 1 and '[model]' not in out
    rc, out, err = run(flex_args(toy, tmp_path / 'b')[1:])          # FlexVAR's tokenizer without --flex
    assert rc == 1 and "is FlexVAR's tokenizer (FlexVAE): add --flex" in err and err.count('\n') == 1, err
    # resuming a --flex run without --flex (or the reverse) is refused before any model is built
    shutil.copytree(implicit_run[0], tmp_path / 'c')
    rc, out, err = run(flex_args(toy, tmp_path / 'c', '--use_implicit', '--p_depth', '1', ep=3)[1:])
    assert rc == 1 and '--flex True, but this command gives --flex False' in err and '[model]' not in out, err
    from utils.arg_util import parse_args
    assert parse_args(['--flex']).vae_ckpt == f'ckpts/{FLEX_TOKENIZER}'
    assert parse_args([]).vae_ckpt == f'ckpts/{VAR_TOKENIZER}'
