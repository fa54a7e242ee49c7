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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
import sampling
from models import FlexVAR, build_flexvar, build_vae_var, flex_train_schedule_for
from models.checkpoint import load_vae_var
from utils import sampling_utils

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
    """FlexVAE.pth ({'model': state dict}), flex.pth (explicit FlexVAR, depth 1), flex_implicit.pth (1 pre + 1
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
            torch.save({'model': vae.state_dict()}, d / 'FlexVAE.pth')
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
    ``g_seed`` as sampling.py / gen_img.py seed it; fp32 on CPU, converted as the official VAR scripts (x 255, uint8)."""
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
    vae, var = load_vae_var(str(ckpts / 'FlexVAE.pth'), str(ckpts / 'flex.pth'))
    assert isinstance(var, FlexVAR)
    for pn, side in (('1_2_4', 64), ('1_2_3_4_6', 96)):
        sampling.main(sampling.parse_args([
            '--ckpt_path', str(ckpts / 'flex.pth'), '--vae_ckpt', str(ckpts / 'FlexVAE.pth'), '--infer_pn', pn,
            '--cfg', '2.5', '--top_p', '0.95', '--sample_dir', str(tmp_path), '--num_classes', '2', '--per_class', '3',
            '--batch_size', '2']))
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
        record = json.loads((folder / sampling.CONFIG_NAME).read_text())
        assert record['infer_patch_nums'] == list(schedule) and record['max_pn'] == 16
        assert record['used_llamagen_cfg'] is False and record['vae_ckpt'] == 'FlexVAE.pth'
        assert 'iter_left' not in record           # an explicit backbone ignores the iteration knob


def test_sampling_implicit_flexvar_with_guidance_flags_and_the_default_tokenizer(ckpts, tmp_path, monkeypatch):
    """The default schedule (the official 1_2_..._16: 256 px) with LlamaGen's guidance, max_pn 4 (greedy, full cfg
    above it) and 3 -> 1 implicit iterations; --vae_ckpt left out: ckpts/FlexVAE.pth, found by the model's kind."""
    (tmp_path / 'ckpts').mkdir()
    shutil.copy(ckpts / 'FlexVAE.pth', tmp_path / 'ckpts' / 'FlexVAE.pth')
    monkeypatch.chdir(tmp_path)
    args = sampling.parse_args(['--ckpt_path', str(ckpts / 'flex_implicit.pth'), '--use_implicit', '--sample_dir', 's',
                                '--num_classes', '1', '--per_class', '1', '--used_llamagen_cfg', '--max_pn', '4',
                                '--iter_left', '3', '--iter_right', '1', '--cfg', '3'])
    sampling.main(args)
    assert args.vae_ckpt == 'ckpts/FlexVAE.pth'
    folder = tmp_path / 's' / ('flexvar-implicit-d1-flex_implicit.pth-pn1_2_3_4_5_6_8_10_13_16-cfg-3.0-maxpn-4-llamagen-'
                               'seed-1')
    record = json.loads((folder / sampling.CONFIG_NAME).read_text())
    assert (record['infer_patch_nums'], record['max_pn'], record['used_llamagen_cfg']) == \
        ([1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 4, True)
    assert (record['iter_left'], record['iter_right']) == (3, 1)
    vae, var = load_vae_var('ckpts/FlexVAE.pth', str(ckpts / 'flex_implicit.pth'))
    want = direct(var, vae, 0, 1, 1, None, cfg=3.0, max_pn=4, llamagen=True, iter_left=3, iter_right=1)
    assert want.shape == (1, 256, 256, 3) and np.array_equal(read_png(folder / '000000.png'), want[0])


# ================================ gen_img.py ==========================================================================
def test_gen_img_two_schedules_and_resolutions(ckpts, tmp_path):
    vae, var = load_vae_var(str(ckpts / 'FlexVAE.pth'), str(ckpts / 'flex.pth'))
    for pn, side in (('1_2_3_4', 64), ('1_2_4_8', 128)):
        gen_img.main(gen_img.parse_args(['--var_ckpt', str(ckpts / 'flex.pth'), '--vae_ckpt', str(ckpts / 'FlexVAE.pth'),
                                         '--infer_patch_nums', pn, '--class_label', '0', '2', '--seeds', '3', '4',
                                         '--save_grid', '--nrow', '2', '--output_dir', str(tmp_path)]))
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
    for name in ('setup_device', 'load_models'):
        monkeypatch.setattr(mod, name, lambda *a, name=name: pytest.fail(f'{name} called for a bad flag'))
    out = tmp_path / 'out'
    common = ['--vae_ckpt', str(ckpts / 'FlexVAE.pth')] + (
        ['--ckpt_path', str(ckpts / 'flex.pth'), '--sample_dir', str(out), '--num_classes', '1'] if mod is sampling
        else ['--var_ckpt', str(ckpts / 'flex.pth'), '--output_dir', str(out)])
    with pytest.raises(SystemExit) as e:
        mod.main(mod.parse_args(common + argv))
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
            sampling.main(sampling.parse_args(base + extra))
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and 'holds VAR-d1, whose scales are fixed' in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / 's').exists()
    # a FlexVAR model with VAR's tokenizer (and the reverse): one sentence naming --vae_ckpt
    for var_ckpt, vae_ckpt, want in (('flex.pth', 'vae.pth', "needs FlexVAR's tokenizer (FlexVAE.pth)"),
                                     ('var.pth', 'FlexVAE.pth', "needs VAR's multi-scale VQVAE")):
        with pytest.raises(SystemExit) as e:
            gen_img.main(gen_img.parse_args(['--var_ckpt', str(ckpts / var_ckpt), '--vae_ckpt', str(ckpts / vae_ckpt),
                                             '--output_dir', str(tmp_path / 'g')]))
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and '--vae_ckpt' in err and len(err.strip().splitlines()) == 1


def test_missing_published_flexvar_files_give_the_download_message(tmp_path):
    """Offline, a published FlexVAR file at its default place: the one-line message with its URL (the model first;
    with the model there, its tokenizer FlexVAE.pth, chosen by the model's kind)."""
    for name in ('FlexVARd16-epo179.pth', 'FlexVAE.pth'):
        r = subprocess.run([sys.executable, str(REPO / 'gen_img.py'), '--var_ckpt', 'ckpts/FlexVARd16-epo179.pth'],
                           cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
        url = f'https://huggingface.co/jiaosiyu1999/FlexVAR/resolve/main/{name}'
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
        assert f"'ckpts/{name}'" in r.stderr and f'wget -O ckpts/{name} {url}' in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'gen_images').exists()
        (tmp_path / 'ckpts').mkdir(exist_ok=True)
        torch.manual_seed(0)
        _, var = build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=1, device='meta')
        torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in var.state_dict().items()},
                   tmp_path / 'ckpts' / 'FlexVARd16-epo179.pth')


# ================================ scripts/eval.sh =====================================================================
def test_eval_sh_flexvar_commands_name_the_folder_sampling_py_writes(tmp_path):
    """FLEXVAR=d{16,20,24} [INFER_PN=...] [CFG=...] with a stand-in interpreter: the sampling.py command has the
    official evaluation settings, and the npz given to the evaluator is the one that command writes."""
    log, stub, ref = tmp_path / 'calls.txt', tmp_path / 'python', tmp_path / 'ref.npz'
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    ref.write_bytes(b'stand-in')
    cases = [({'FLEXVAR': 'd16'}, 16, 'FlexVARd16-epo179.pth', '1_2_3_4_5_6_8_10_13_16', '2.5'),
             ({'FLEXVAR': 'd20', 'INFER_PN': '1_2_3_4_5_6_7_8_9_10_12_14_16'}, 20, 'FlexVARd20-epo249.pth',
              '1_2_3_4_5_6_7_8_9_10_12_14_16', '2.5'),
             ({'FLEXVAR': 'd24', 'INFER_PN': '512'}, 24, 'FlexVARd24-epo349.pth',
              '1_2_3_4_5_6_7_8_9_10_12_14_16_23_32', '3.0'),
             ({'FLEXVAR': 'd24', 'INFER_PN': '1-2-04-8', 'CFG': '4'}, 24, 'FlexVARd24-epo349.pth', '1_2_4_8', '4.0'),
             ({'FLEXVAR': 'd16', 'CFG': '2.50'}, 16, 'FlexVARd16-epo179.pth', '1_2_3_4_5_6_8_10_13_16', '2.5')]
    for env_extra, depth, ckpt, pn, cfg in cases:
        log.unlink(missing_ok=True)
        env = dict(os.environ, PYTHON=str(stub), REF_BATCH=str(ref), **env_extra)
        r = subprocess.run(['bash', str(REPO / 'scripts' / 'eval.sh')], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        sample_line, eval_line = log.read_text().splitlines()
        argv = sample_line.split()
        assert argv[0] == 'sampling.py'
        assert ' '.join(argv) == (f'sampling.py --ckpt_path ckpts/{ckpt} --vae_ckpt ckpts/FlexVAE.pth --depth {depth} '
                                  f'--infer_pn {pn} --cfg {cfg} --top_k 900 --top_p 0.95 --max_pn 16 '
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
