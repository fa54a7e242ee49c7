"""train_vae.py: resumes exactly, exports the official format, fails clearly (that it learns: tests/test_demo.py)."""
import os
import subprocess
import sys

import pytest
import torch

from utils.demo_data import make_demo_dataset

# the demo's tokenizer shape: 4x downsampling (16 px images for scales 1..4), one residual block per level, no
# attention, 8 GroupNorm groups; the official shape (1_1_2_2_4, 2 blocks, attention, 32 groups) at the same width
# is ~10x slower per step and learns far slower (32 groups of 1 channel erase the colour level of each image)
TINY = ['--pn', '1_2_3_4', '--ch', '32', '--ch_mult', '1_2_4', '--num_res_blocks', '1', '--attn', 'False',
        '--vocab_size', '32', '--z_channels', '4', '--device', 'cpu', '--threads', '1']


def run_vae(repo_dir, args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, 'train_vae.py', *args], cwd=repo_dir, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_data')
    make_demo_dataset(root, num_train=48, num_val=8, num_classes=4, reso=32, verbose=False)
    return str(root)


@pytest.mark.slow
def test_resume_is_exact_and_export_is_official(repo_dir, data, tmp_path):
    from models.checkpoint import load_vae
    common = ['--data_path', data, *TINY, '--bs', '32', '--ep', '2', '--seed', '3']
    a, b = tmp_path / 'a', tmp_path / 'b'
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(a)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(b), '--debug_kill_at_iter', '6'])
    assert r.returncode == 143, r.stdout + r.stderr
    assert 'rerun the same command to resume' in r.stdout
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(b)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert '[resume]' in r.stdout
    sa = torch.load(a / 'vae_ch32v32z4.pth', weights_only=True)
    sb = torch.load(b / 'vae_ch32v32z4.pth', weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the bare state dict is the official format; the training checkpoint is accepted too
    for path in (a / 'vae_ch32v32z4.pth', a / 'vae-ckpt-last.pth'):
        vae = load_vae(str(path), 'cpu', patch_nums=(1, 2, 3, 4))
        assert (vae.vocab_size, vae.Cvae, vae.ch) == (32, 4, 32)
    assert torch.equal(vae.quantize.embedding.weight, sa['quantize.embedding.weight'])
    # a finished run says so instead of training again
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(a)])
    assert r.returncode == 0 and 'nothing to do' in r.stdout

    # user errors: one line on stderr, exit code 1, no traceback
    r = run_vae(repo_dir, ['--data_path', data, *TINY[:2], '--ch', '32', '--vocab_size', '64', '--z_channels', '4',
                           '--device', 'cpu', '--bs', '16', '--ep', '2', '--local_out_dir_path', str(a)])
    assert r.returncode == 1 and '--vocab_size' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    # GroupNorm groups leave the state dict's keys unchanged: only the flag check stops a resume into another model
    r = run_vae(repo_dir, common + ['--norm_groups', '8', '--local_out_dir_path', str(a)])
    assert r.returncode == 1 and '--norm_groups' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    (b / 'vae-ckpt-last.pth').write_bytes(b'not a checkpoint')
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(b)])
    assert r.returncode == 1 and 'vae-ckpt-last.pth' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    # temporary files of a save killed midway are removed at the next start
    (tmp_path / 'c' / 'recon').mkdir(parents=True)
    for stale in ('.vae-ckpt-last.pth.a1b2c3d4.tmp', 'recon/.ep0001.png.qwertyui.tmp'):
        (tmp_path / 'c' / stale).write_bytes(b'partial')
    r = run_vae(repo_dir, ['--data_path', str(tmp_path / 'nowhere'), *TINY, '--local_out_dir_path', str(tmp_path / 'c')])
    assert r.returncode == 1 and 'nowhere' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list((tmp_path / 'c').rglob('*.tmp')) and 'removed 2 temporary file(s)' in r.stdout


def test_unreadable_image_saves_first(repo_dir, data, tmp_path):
    import shutil
    from utils.data import ResumableBatchSampler, build_dataset
    copy = tmp_path / 'data'
    shutil.copytree(data, copy)
    _, train_set, _ = build_dataset(str(copy), 16)
    sampler = ResumableBatchSampler(len(train_set), 32, 0, 1, seed=3)
    sampler.set_epoch(0, 1)
    bad = train_set.samples[next(iter(sampler))[5][0]][0]           # read first in iteration 2
    with open(bad, 'wb') as f:
        f.write(b'truncated')
    out = tmp_path / 'out'
    r = run_vae(repo_dir, ['--data_path', str(copy), *TINY, '--bs', '32', '--ep', '2', '--seed', '3',
                           '--local_out_dir_path', str(out)])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr, r.stderr
    assert 'checkpoint saved in epoch 1 after iteration 1/' in r.stderr
    ckpt = torch.load(out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['iter']) == (0, 1)
