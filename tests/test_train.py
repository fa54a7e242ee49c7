"""train.py / scripts/train.sh on CPU: a tiny tokenizer (V=64, Cvae=8, ch=32), 3 classes of 64 px images made
here, depth-2 VAR / VIAR.  Training runs are subprocesses with one thread each (torchrun + gloo for 2 ranks);
error paths run in-process through ``train.main``."""
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from readme_commands import readme_command
from utils.zoo import VAR_TOKENIZER

REPO = Path(__file__).resolve().parents[1]
# the official VIAR README's training command (scripts/train.sh): README.md must show it, and train.sh must run it
OFFICIAL_ARGS = ['--nnodes=1', '--node_rank=0', '--nproc_per_node=8', '--master_addr=127.0.0.1', '--master_port=7777',
                 'train.py', '--data_path=/path/to/imagenet-1k', '--depth=30', '--bs=512', '--ep=550', '--tblr=8e-5',
                 '--fp16=1', '--alng=1e-5', '--wpe=0.01', '--twde=0.08', '--use_implicit=True', '--p_depth=5']

V, CVAE, CH, PN = 64, 8, 32, (1, 2, 3, 4)


def readme_args():
    """The arguments of the ``torchrun ... train.py ...`` command that README.md shows."""
    return readme_command('torchrun')[1:]


# ============================================== fixtures and helpers ==================================================
@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """3 visually distinct classes (8 train / 2 val images each, 64 px PNG) and a random tokenizer checkpoint."""
    root = tmp_path_factory.mktemp('toy')
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]
    for split, n in (('train', 8), ('val', 2)):
        for c, colour in enumerate(colours):
            d = root / 'data' / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
                if c == 1:
                    a[16:48, 16:48] = 255
                if c == 2:
                    a[:, ::8] = 0
                Image.fromarray(a).save(d / f'{i}.png')
    from models import VQVAE
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=V, z_channels=CVAE, ch=CH, v_patch_nums=PN)
    vae.init_weights()
    torch.save(vae.state_dict(), root / 'vae.pth')
    return {'data': str(root / 'data'), 'vae': str(root / 'vae.pth'), 'root': root}


def train_args(toy, out, *extra, ep=1, bs=4):
    return ['--data_path', toy['data'], '--vae_ckpt', toy['vae'], '--pn', '1_2_3_4', '--depth', '2', '--bs', str(bs),
            '--ep', str(ep), '--seed', '0', '--log_freq', '1', '--save_freq', '1', '--local_out_dir_path', str(out),
            *map(str, extra)]


def run_train(args, nproc=1, timeout=300, new_session=False, faults=None):
    """``new_session``: train.py leads its own process group (a test may signal the whole group); ``faults``: what
    to inject (``VIAR_TEST_FAULTS``, ``utils.training.Faults``)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', VIAR_TEST_FAULTS=faults or '')
    if nproc == 1:
        cmd = [sys.executable, 'train.py', *args]
    else:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}',
               'train.py', *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


def read_events(tb_dir):
    """Events of every event file in ``tb_dir`` (sorted by name = by start time), parsed without TensorFlow."""
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


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def tb_dir(out):
    dirs = list(Path(out).glob('tb-*'))
    assert len(dirs) == 1, dirs
    return dirs[0]


def train_cli(argv, faults=None):
    """(exit status, stdout, stderr) of ``python train.py ARGV``."""
    r = run_train(argv, faults=faults)
    return r.returncode, r.stdout, r.stderr


# ============================================== flags, schedule, sampler (in-process) =================================
def test_boolean_flags_and_readme_command():
    from utils.arg_util import parse_args
    from utils.train_config import train_config, train_values

    def finalize_args(flags, world_size):
        return train_config(flags, train_values(flags, world_size))
    base = ['--data_path', 'x']
    for flags, want in ((['--use_implicit=True'], True), (['--use_implicit', 'True'], True), (['--use_implicit'], True),
                        (['--use_implicit', '--p_depth', '3'], True), (['--use_implicit', 'False'], False),
                        (['--use_implicit=false'], False), (['--use_implicit=0'], False), ([], False)):
        assert parse_args(base + flags).use_implicit is want, flags
    assert parse_args(base + ['--anorm', 'False']).anorm is False
    assert parse_args(base + ['--pn', '512']).patch_nums == [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]
    with pytest.raises(SystemExit):
        parse_args(base + ['--use_implicit=maybe'])
    with pytest.raises(SystemExit):
        parse_args(base + ['--pn', '4_2'])

    cmd = readme_args()
    assert cmd == OFFICIAL_ARGS
    args = finalize_args(parse_args(cmd[6:]), world_size=8)
    assert (args.depth, args.use_implicit, args.p_depth, args.fp16, args.ep) == (30, True, 5, 1, 550)
    assert args.patch_nums == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and args.data_load_reso == 256
    assert (args.batch_size, args.glb_batch_size) == (64, 512)
    assert math.isclose(args.tlr, 8e-5 * 512 / 256) and args.twde == 0.08 and math.isclose(args.wp, 11)
    assert args.tb_name.startswith('tb-VARd30__pn1_2_3_4_5_6_8_10_13_16')
    ac = finalize_args(parse_args(cmd[6:] + ['--ac', '2']), world_size=8)
    assert ac.batch_size == 32 and math.isclose(ac.tlr, 8e-5 * 512 / 256)    # same lr per optimiser step of 512 images
    # loader workers default to min(8, CPUs per process); --pn's help names the tokenizer's downsampling
    from utils.arg_util import default_workers, get_parser
    assert args.workers == min(default_workers(), 64) >= 1 and finalize_args(
        parse_args(OFFICIAL_ARGS[6:] + ['--workers', '0']), world_size=8).workers == 0
    assert "image side = the tokenizer's downsampling" in ' '.join(get_parser().format_help().split())


def test_lr_wd_schedule_and_param_groups():
    from models import build_vae_var
    from utils.lr_control import lr_ratio, param_groups, wd_at
    max_it, wp_it, wp0, wpe = 1000, 100, 0.005, 0.01
    r = [lr_ratio('lin0', i, wp_it, max_it, wp0=wp0, wpe=wpe) for i in range(max_it)]
    assert math.isclose(r[0], wp0) and math.isclose(r[50], wp0 + (1 - wp0) * 0.5)
    assert all(a < b for a, b in zip(r[:100], r[1:101]))                     # linear warm-up
    flat_end = wp_it + int(0.05 * (max_it - 1 - wp_it))
    assert all(x == 1.0 for x in r[wp_it:flat_end])                         # flat for 5 % after warm-up
    assert all(a >= b for a, b in zip(r[wp_it:], r[wp_it + 1:])) and math.isclose(r[-1], wpe)
    assert math.isclose(lr_ratio('cos', max_it - 1, wp_it, max_it, wpe=wpe), wpe)
    assert math.isclose(wd_at(0.05, 0.08, 0, max_it), 0.05)
    assert math.isclose(wd_at(0.05, 0.08, max_it - 1, max_it), 0.08)

    _, var = build_vae_var(device='meta', patch_nums=PN, V=V, Cvae=CVAE, ch=CH, num_classes=3, depth=2,
                           shared_aln=True, use_implicit=True, pre_depth=1, post_depth=1)
    names, groups = param_groups(var)
    by_name = {g['name']: {id(p) for p in g['params']} for g in groups}
    params = dict(var.named_parameters())
    assert sorted(names) == sorted(params)
    nd = [n for n, p in params.items() if id(p) in by_name['ND']]
    d = [n for n, p in params.items() if id(p) in by_name['D']]
    for key in ('pos_1LC', 'pos_start', 'lvl_embed.weight', 'ada_gss', 'scale_mul_1H11', 'word_embed.bias'):
        assert any(key in n for n in nd) and not any(key in n for n in d), key
    assert 'backbone.implicit_block.attn.mat_qkv.weight' in d and 'head.weight' in d and 'class_emb.weight' in d
    assert {g['wd_sc'] for g in groups} == {0.0, 1.0}


def test_sampler_covers_data_and_resumes():
    from utils.data import ResumableBatchSampler
    def batches(rank, ep, start_it=0):
        s = ResumableBatchSampler(10, batch_size=2, rank=rank, world_size=2, seed=3)
        s.set_epoch(ep, start_it)
        return list(s)
    full = [batches(r, 0) for r in (0, 1)]
    assert len(full[0]) == 3 and all(len(b) == 2 for b in full[0])
    seen = [i for r in (0, 1) for b in full[r] for i, _ in b]
    assert set(seen) == set(range(10))                                         # every image, padded by wrapping
    assert batches(1, 0, start_it=1) == full[1][1:]                            # resume = the tail of the same epoch
    assert batches(0, 1) != full[0] and batches(0, 0) == full[0]
    assert len({seed for b in full[0] for _, seed in b}) == 6                   # one augmentation seed per sample


def test_train_sh_runs_the_readme_command(tmp_path, toy):
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'torchrun').write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$ARGV_OUT"\n')
    (fake / 'python3').write_text('#!/usr/bin/env bash\nexit 0\n')        # a --data_path check that always passes
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    env.update(PATH=f'{fake}:{os.environ["PATH"]}', ARGV_OUT=str(tmp_path / 'argv.txt'))
    r = subprocess.run(['bash', str(REPO / 'scripts' / 'train.sh')], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    cwd, *argv = (tmp_path / 'argv.txt').read_text().splitlines()
    assert 'bash scripts/train.sh' in (REPO / 'README.md').read_text()
    assert Path(cwd) == REPO and argv == readme_args() == OFFICIAL_ARGS
    subprocess.run(['bash', str(REPO / 'scripts' / 'train.sh'), '--data_path=/data/in1k'], env=env, check=True)
    assert (tmp_path / 'argv.txt').read_text().splitlines()[1:] == readme_args() + ['--data_path=/data/in1k']

    # with the real check, a wrong --data_path (or the placeholder) stops in one line before torchrun starts
    env['PYTHON'] = sys.executable
    for extra, want in ((['--data_path=/nonexistent'], "'/nonexistent' does not exist"), ([], 'placeholder'),
                        (['--data_path', '/data/in1k', '--data_path', str(toy['root'])], 'has no train/ and no val/')):
        (tmp_path / 'argv.txt').unlink(missing_ok=True)
        r = subprocess.run(['bash', str(REPO / 'scripts' / 'train.sh'), *extra], env=env, capture_output=True,
                           text=True)
        assert r.returncode == 1 and want in r.stderr and r.stderr.count('\n') == 1, r.stderr
        assert r.stderr.startswith('scripts/train.sh: error:') and not (tmp_path / 'argv.txt').exists()
    r = subprocess.run(['bash', str(REPO / 'scripts' / 'train.sh'), '--data_path', toy['data']], env=env)
    assert r.returncode == 0 and (tmp_path / 'argv.txt').read_text().splitlines()[1:] == OFFICIAL_ARGS + [
        '--data_path', toy['data']]


# ============================================== two processes (torchrun, gloo) ========================================
@pytest.fixture(scope='module', params=['VAR', 'VIAR'])
def ddp_run(request, toy, tmp_path_factory):
    out = tmp_path_factory.mktemp(f'ddp_{request.param}')
    extra = ['--use_implicit', '--p_depth', '1'] if request.param == 'VIAR' else []
    r = run_train(train_args(toy, out, *extra), nproc=2, faults='nonfinite_at=2' if request.param == 'VIAR' else None)
    return {'kind': request.param, 'out': out, 'proc': r}


def test_ddp_two_ranks_train_and_write_every_output(ddp_run):
    from models import build_vae_var
    from utils.training import param_fingerprint
    r, out = ddp_run['proc'], ddp_run['out']
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    for name in ('stdout.txt', 'stderr.txt', 'log.txt', 'ar-ckpt-last.pth', 'ar-ckpt-best.pth'):
        assert (out / name).is_file(), name
    assert r.stdout.count('[data] 24 train / 6 val images') == 1                # rank 1 prints nothing
    assert '[data] 24 train' in (out / 'stdout.txt').read_text()
    kinds = [rec['kind'] for rec in log_lines(out)]
    assert kinds == ['val', 'epoch']
    assert log_lines(out)[1]['it'] == 6 and math.isfinite(log_lines(out)[1]['L_mean'])

    tb = tb_dir(out)
    assert tb.name.startswith('tb-VARd2__pn1_2_3_4')
    (events,) = read_events(tb)
    for tag in ('AR_iter_loss/L_mean', 'AR_iter_loss/L_tail', 'AR_iter_loss/acc_mean', 'AR_iter_loss/acc_tail',
                'AR_iter_scale/L_64', 'AR_iter_scale/acc_16', 'AR_opt_lr/lr', 'AR_opt_wd/wd', 'AR_opt_grad/grad_norm',
                'AR_speed/img_per_s', 'AR_ep_loss/L_mean', 'AR_val/vL_tail'):
        assert scalars(events, tag), tag
    assert sorted(scalars(events, 'AR_iter_loss/L_mean')) == list(range(6))

    ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['iter']) == (1, 0) and ckpt['args']['world_size'] == 2
    assert {'var_wo_ddp', 'vae_local', 'var_opt', 'config'} <= set(ckpt['trainer'])
    # the two ranks' parameters are identical, and they are the ones saved
    fps = ckpt['resume']['rank_fingerprints']
    assert fps.shape[0] == 2 and torch.equal(fps[0], fps[1])
    viar = ddp_run['kind'] == 'VIAR'
    _, var = build_vae_var(device='cpu', patch_nums=PN, V=V, Cvae=CVAE, ch=CH, num_classes=3, depth=2,
                           use_implicit=viar, pre_depth=1, post_depth=1)
    fresh = param_fingerprint(var)
    var.load_state_dict(ckpt['trainer']['var_wo_ddp'], strict=True)
    # (float64 sums: equal up to the summation order of another thread count)
    assert torch.allclose(param_fingerprint(var), fps[0], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(fresh, fps[0], rtol=1e-3)
    if viar:    # a non-finite step under DDP is skipped on both ranks, logged, and training goes on
        assert 'non-finite loss or gradient' in r.stdout and log_lines(out)[1]['skipped'] == 1
        assert len(scalars(events, 'AR_implicit/n0_no_grad')) == 6


def test_checkpoint_loads_strictly_and_samples(ddp_run, toy):
    from models import build_vae_var
    assert ddp_run['proc'].returncode == 0
    viar = ddp_run['kind'] == 'VIAR'
    for name in ('ar-ckpt-last.pth', 'ar-ckpt-best.pth'):
        ckpt = torch.load(ddp_run['out'] / name, map_location='cpu', weights_only=True)
        vae, var = build_vae_var(device='cpu', patch_nums=PN, V=V, Cvae=CVAE, ch=CH, num_classes=3, depth=2,
                                 use_implicit=viar, pre_depth=1, post_depth=1)
        var.load_state_dict(ckpt['trainer']['var_wo_ddp'], strict=True)
        vae.load_state_dict(ckpt['trainer']['vae_local'], strict=True)
        tokenizer = torch.load(toy['vae'], weights_only=True)
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in tokenizer.items())
        var.eval()
        img = var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([0, 2]), g_seed=0, cfg=1.5, top_k=10, top_p=0.9,
                                           iter_left=3, iter_right=3)
        assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


# ============================================== exact resume ==========================================================
def resume_args(toy, out, *extra, data=None):
    args = train_args(toy, out, '--use_implicit', '--p_depth', '1', '--hflip', *extra, ep=2)
    if data:
        args[1] = str(data)
    return args


@pytest.fixture(scope='module')
def uninterrupted(toy, tmp_path_factory):
    """The run the interrupted ones must reproduce exactly: VIAR, 2 epochs of 6 iterations, h-flips."""
    out = tmp_path_factory.mktemp('uninterrupted') / 'A'
    r = run_train(resume_args(toy, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def strip_times(records):
    return [{k: v for k, v in rec.items() if k not in ('elapsed_s', 'remain_time')} for rec in records]


def assert_same_run(a, b):
    """Per-epoch records (the interrupted epoch included), final weights and optimizer state are identical."""
    assert strip_times(log_lines(b)) == strip_times(log_lines(a))
    ca, cb = (torch.load(o / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True) for o in (a, b))
    assert all(torch.equal(v, cb['trainer']['var_wo_ddp'][k]) for k, v in ca['trainer']['var_wo_ddp'].items())
    sa, sb = ca['trainer']['var_opt']['optimizer']['state'], cb['trainer']['var_opt']['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)


@pytest.mark.slow
def test_resume_after_sigterm_or_kill_is_exact(toy, tmp_path, uninterrupted):
    base = lambda out, *extra: resume_args(toy, out, *extra)
    A, B, C, D = uninterrupted, tmp_path / 'B', tmp_path / 'C', tmp_path / 'D'

    # SIGTERM during iteration 7 (0-based): a checkpoint after it, exit 143; the same command resumes
    cmd_b = base(B)
    r1 = run_train(cmd_b, faults='kill_at=7')
    assert r1.returncode == 143 and 'SIGTERM' in r1.stdout and 'rerun the same command' in r1.stdout
    r2 = run_train(cmd_b)
    assert r2.returncode == 0 and '[resume]' in r2.stdout, r2.stderr[-3000:]

    # SIGKILL at iteration 8 with a checkpoint every 3 iterations: resumes from iteration 6
    cmd_c = base(C, '--ckpt_every_iters', 3)
    r1 = run_train(cmd_c, faults='kill_at=8 signal=KILL')
    assert r1.returncode == -9
    r2 = run_train(cmd_c)
    assert r2.returncode == 0, r2.stderr[-3000:]

    # SIGTERM to the whole process group (as a scheduler or `timeout` sends it) with loader workers: the workers
    # ignore it, the main process saves and stops; the rerun resumes
    cmd_d = base(D, '--workers', '2')
    r1 = run_train(cmd_d, new_session=True, faults='kill_at=7 signal=TERM_GROUP')
    assert r1.returncode == 143 and 'SIGTERM' in r1.stdout and 'Traceback' not in r1.stderr, r1.stderr[-3000:]
    r2 = run_train(cmd_d)
    assert r2.returncode == 0 and '[resume]' in r2.stdout, r2.stderr[-3000:]
    assert_same_run(A, D)

    (ev_a,) = read_events(tb_dir(A))
    for out, resumed_from in ((B, 8), (C, 6)):
        files = read_events(tb_dir(out))
        assert len(files) == 2
        for tag in ('AR_iter_loss/train_loss', 'AR_iter_loss/acc_mean', 'AR_implicit/n0_no_grad',
                    'AR_implicit/n1_with_grad'):
            want = scalars(ev_a, tag)
            first, second = scalars(files[0], tag), scalars(files[1], tag)
            assert sorted(want) == list(range(12)) and min(second) == resumed_from and max(second) == 11
            assert {k: want[k] for k in first} == first and {k: want[k] for k in second} == second, (out, tag)
        # per-epoch records (the interrupted epoch included), final weights and optimizer state equal A's
        assert_same_run(A, out)


def test_activation_checkpointing_changes_nothing(toy, tmp_path, uninterrupted):
    """--grad_ckpt recomputes activations in backward: the same losses, gradients (grad norms in log.txt) and
    weights, bit for bit."""
    r = run_train(resume_args(toy, tmp_path / 'ckpt', '--grad_ckpt'))
    assert r.returncode == 0 and 'activation checkpointing' in r.stdout, r.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path / 'ckpt')


def corrupt(path: Path) -> bytes:
    good = path.read_bytes()
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not an image' * 10)
    return good


@pytest.mark.slow
def test_unreadable_image_saves_first_and_check_data_lists_all(toy, tmp_path, uninterrupted, capsys):
    from utils.data import ResumableBatchSampler, build_dataset
    data, out = tmp_path / 'data', tmp_path / 'D'
    shutil.copytree(toy['data'], data)
    _, train_set, val_set = build_dataset(str(data), 64)
    sampler = ResumableBatchSampler(len(train_set), 4, 0, 1, seed=0)
    sampler.set_epoch(0, 2)                              # first read in epoch 1, iteration 3
    bad_train = Path(train_set.samples[next(iter(sampler))[0][0]][0])
    bad_val = Path(val_set.samples[-1][0])
    good_train, good_val = corrupt(bad_train), corrupt(bad_val)

    # --check_data: every unreadable image at once (one line, the full list in bad_images.txt), nothing trained
    rc, stdout, err = train_cli(resume_args(toy, out, '--check_data', data=data))
    assert rc == 1 and err.count('\n') == 1 and '2 of 30 images cannot be decoded' in err, err
    assert str(bad_train) in err and str(bad_val) in err and '[model]' not in stdout
    listed = (out / 'bad_images.txt').read_text().splitlines()
    assert sorted(line.split('\t')[0] for line in listed) == sorted([str(bad_train), str(bad_val)])
    assert not (out / 'ar-ckpt-last.pth').exists()

    # --skip_bad_images: the run goes on over the bad images, counting them
    args = train_args(toy, tmp_path / 'skip', '--skip_bad_images')
    args[1] = str(data)
    r = run_train(args)
    assert r.returncode == 0 and 'unreadable image file(s) so far' in r.stderr, r.stderr[-3000:]

    # an unreadable validation image: the epoch is saved (and logged) first
    bad_train.write_bytes(good_train)
    args = train_args(toy, tmp_path / 'V', ep=1)
    args[1] = str(data)
    r = run_train(args)
    assert r.returncode == 1 and 'validation of epoch 1' in r.stderr and str(bad_val) in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'V' / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['iter']) == (1, 0) and [rec['kind'] for rec in log_lines(tmp_path / 'V')] == ['epoch']

    # training (2 loader workers): the checkpoint of the last optimizer step is saved, then one line names the image
    bad_val.write_bytes(good_val)
    corrupt(bad_train)
    r = run_train(resume_args(toy, out, data=data))
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'cannot read image' in r.stderr and str(bad_train) in r.stderr and 'checkpoint saved' in r.stderr
    ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['iter']) == (0, 2)
    # once the image is replaced, the same command resumes and ends exactly where the uninterrupted run did
    bad_train.write_bytes(good_train)
    r = run_train(resume_args(toy, out, data=data))
    assert r.returncode == 0 and '[resume]' in r.stdout, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


# ============================================== learning ==============================================================
def test_ddp_rank_with_an_unreadable_image_saves_and_stops_every_rank(toy, tmp_path):
    """Rank 1 alone meets the image: no rank waits forever for it; both save at the last step and stop."""
    from utils.data import ResumableBatchSampler, build_dataset
    data, out = tmp_path / 'data', tmp_path / 'out'
    shutil.copytree(toy['data'], data)
    _, train_set, _ = build_dataset(str(data), 64)
    sampler = ResumableBatchSampler(len(train_set), 2, rank=1, world_size=2, seed=0)
    sampler.set_epoch(0, 2)
    bad = train_set.samples[next(iter(sampler))[0][0]][0]
    corrupt(Path(bad))
    args = train_args(toy, out)
    args[1] = str(data)
    r = run_train(args, nproc=2, timeout=120)
    assert r.returncode != 0 and f"train.py: error: cannot read image '{bad}'" in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['iter']) == (0, 2) and ckpt['resume']['rank_fingerprints'].shape[0] == 2


def test_loss_goes_down_on_toy_classes(toy, tmp_path):
    out = tmp_path / 'learn'
    r = run_train(train_args(toy, out, '--tblr', '0.05', '--save_freq', '4', '--log_freq', '0', ep=8, bs=8))
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [rec for rec in log_lines(out) if rec['kind'] == 'epoch']
    vals = [rec for rec in log_lines(out) if rec['kind'] == 'val']
    assert len(epochs) == 8 and len(vals) == 2
    # margins, identical with ATEN_CPU_CAPABILITY=default / avx2 / native and 1 or 2 threads: the untrained loss is
    # 0.005 from ln V (bound 0.1; the first epoch's mean, 0.006 inside its old bound, was too close to call); the
    # epoch loss falls by 1.22 (bound 0.5); validation loss ln V - 1.33 (bound ln V - 0.5), accuracy 25.6 %
    # (bound 4.7 %)
    (events,) = read_events(tb_dir(out))
    assert abs(scalars(events, 'AR_iter_loss/L_mean')[0] - math.log(V)) < 0.1        # starts at chance
    assert epochs[-1]['L_mean'] < epochs[0]['L_mean'] - 0.5
    assert vals[-1]['vL_mean'] < math.log(V) - 0.5 and vals[-1]['vacc_mean'] > 100 / V * 3


# ============================================== user errors: one message, non-zero exit ===============================
@pytest.mark.parametrize('case', ['missing', 'no_val', 'val_without_classes', 'empty_class', 'placeholder'])
def test_bad_data_path_stops_before_building_models(case, toy, tmp_path, capsys):
    root = tmp_path / 'd'
    want = {'missing': 'does not exist', 'no_val': 'has no val/ folder',
            'val_without_classes': 'holds no class folders', 'empty_class': 'Found no valid file',
            'placeholder': 'placeholder'}[case]
    if case != 'missing':
        shutil.copytree(toy['data'], root)
    if case == 'no_val':
        shutil.rmtree(root / 'val')
    elif case == 'val_without_classes':
        shutil.rmtree(root / 'val')
        (root / 'val').mkdir()
    elif case == 'empty_class':
        (root / 'train' / 'class3').mkdir()
    argv = train_args(toy, tmp_path / 'out')
    argv[1] = '/path/to/imagenet-1k' if case == 'placeholder' else str(root)
    rc, out, err = train_cli(argv)
    assert rc == 1 and want in err and err.count('\n') == 1 and 'Traceback' not in err
    assert '[model]' not in out and ('--data_path' in err or str(root) in err)


def test_start_removes_temporary_files_of_an_interrupted_save(toy, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    stale = ['.ar-ckpt-last.pth.k2j4h5g6.tmp', 'ar-ckpt-best.pth.tmp', '.log.txt.abcd_fgh.tmp']     # utils.misc's names
    keep = ['notes.tmp', '.hidden', 'ar-ckpt-last.pth.bak', '.ar-ckpt-last.pth.tmp']
    for name in stale + keep:
        (out / name).write_bytes(b'x' * 1000)
    argv = train_args(toy, out)
    argv[1] = str(tmp_path / 'missing')
    rc, stdout, err = train_cli(argv)
    assert rc == 1 and 'removed 3 temporary file(s)' in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(keep + ['stdout.txt', 'stderr.txt'])
    assert 'does not exist' in (out / 'stderr.txt').read_text()           # the error line is kept in the run folder


def test_missing_tokenizer_says_where_to_get_it(toy, tmp_path, capsys):
    argv = train_args(toy, tmp_path / 'out')
    argv[3] = str(tmp_path / 'ckpts' / VAR_TOKENIZER)
    rc, out, err = train_cli(argv)
    assert rc == 1 and 'Traceback' not in err and err.count('\n') == 1 and '[model]' not in out
    assert 'not found' in err and 'ckpts/' in err and \
        f'https://huggingface.co/FoundationVision/var/resolve/main/{VAR_TOKENIZER}' in err


def test_nonfinite_losses_in_a_row_stop_the_run(toy, tmp_path, capsys):
    argv = train_args(toy, tmp_path / 'out', '--max_nonfinite', '3')
    rc, out, err = train_cli(argv, faults='nonfinite_at=1,2,3')
    assert rc == 1 and out.count('step skipped') == 3 and '3 iterations in a row had a non-finite loss' in err
    assert 'Traceback' not in err and '--tblr' in err


def test_resume_refuses_a_checkpoint_of_another_model(ddp_run, toy, tmp_path, capsys):
    out = tmp_path / 'other'
    shutil.copytree(ddp_run['out'], out)
    rc, stdout, err = train_cli(train_args(toy, out, '--depth', '3'))
    assert rc == 1 and '--depth 2' in err and '--depth 3' in err and '[model]' not in stdout
    # another tokenizer of the same shape is refused (its tokens change the targets), unless asked for
    from models import VQVAE
    torch.manual_seed(1)
    other = VQVAE(vocab_size=V, z_channels=CVAE, ch=CH, v_patch_nums=PN)
    other.init_weights()
    torch.save(other.state_dict(), tmp_path / 'other_vae.pth')
    argv = train_args(toy, out, *(['--use_implicit', '--p_depth', '1'] if ddp_run['kind'] == 'VIAR' else []))
    argv[3] = str(tmp_path / 'other_vae.pth')
    rc, stdout, err = train_cli(argv)
    assert rc == 1 and '--vae_ckpt' in err and '--allow_other_vae' in err and '[model]' not in stdout, err
    rc, stdout, err = train_cli(argv + ['--allow_other_vae'])
    assert rc == 0 and 'nothing to do' in stdout and '--allow_other_vae' in err, err
    (out / 'ar-ckpt-last.pth').write_bytes(b'not a checkpoint' * 10)
    rc, _, err = train_cli(train_args(toy, out))
    assert rc == 1 and 'cannot resume' in err and 'Traceback' not in err
