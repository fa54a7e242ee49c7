"""train_vae.py: resumes exactly, exports the official format, fails clearly (that it learns: tests/test_demo.py);
with --flex (FlexVAR's tokenizer) the same, and its reconstruction losses -- full scale and the drawn smaller one --
fall."""
import json
import os
import re
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


def run_vae(repo_dir, args, timeout=300, faults=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', VIAR_TEST_FAULTS=faults or '')
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
    r = run_vae(repo_dir, common + ['--local_out_dir_path', str(b)], faults='kill_at=6')
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
    r = run_vae(repo_dir, ['--data_path', str(tmp_path / 'nowhere'), *TINY,
                           '--local_out_dir_path', str(tmp_path / 'c')])
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


# FlexVAE at the same tiny size (the layout always has attention at the lowest resolution)
FLEX_TINY = ['--flex', '--pn', '1_2_3_4', '--ch', '32', '--ch_mult', '1_2_4', '--num_res_blocks', '1',
             '--norm_groups', '8', '--vocab_size', '32', '--z_channels', '16', '--codebook_dim', '4', '--device', 'cpu',
             '--threads', '1']


def iteration_losses(stdout):
    """(rec_mse, ms_mse, drawn side) of every logged iteration."""
    return [(float(m.group(1)), float(m.group(2)), int(m.group(3))) for m in
            re.finditer(r'rec_mse ([\d.]+)  vq [\d.]+  ms_mse ([\d.]+) \(pn (\d+)\)', stdout)]


def epoch_records(out):
    return [{k: v for k, v in json.loads(line).items() if k != 'elapsed_s'}
            for line in (out / 'log.txt').read_text().splitlines()]


def test_flex_defaults_are_the_published_tokenizers():
    """Without size flags each family gets its published file's architecture (FLEX_TOKENIZER: ch 128, z_channels
    256, V 8912, Cvae 32; VAR_TOKENIZER); flags given win."""
    from utils.arg_util import parse_vae_args
    a = parse_vae_args(['--data_path', 'd', '--flex'])
    assert (a.ch, a.z_channels, a.vocab_size, a.codebook_dim, a.ch_mult, a.downsample) == \
        (128, 256, 8912, 32, (1, 1, 2, 2, 4), 16)
    b = parse_vae_args(['--data_path', 'd'])
    assert (b.ch, b.z_channels, b.vocab_size, b.flex) == (160, 32, 4096, False) and not hasattr(b, 'codebook_dim')
    c = parse_vae_args(['--data_path', 'd', '--flex', '--vocab_size', '64', '--codebook_dim', '8'])
    assert (c.vocab_size, c.codebook_dim, c.z_channels) == (64, 8, 256)


@pytest.mark.slow
def test_flex_resumes_exactly_learns_and_exports_what_train_py_reads(repo_dir, data, tmp_path):
    from models import FlexVAE
    from models.checkpoint import load_vae, tokenizer_downsample
    from train_vae import FlexRecipe
    common = ['--data_path', data, *FLEX_TINY, '--bs', '32', '--ep', '2', '--seed', '3', '--log_freq', '1',
              '--lr', '3e-3', '--wp', '0.5']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ra = run_vae(repo_dir, common + ['--local_out_dir_path', str(a)])
    assert ra.returncode == 0, ra.stdout + ra.stderr
    assert '[model] FlexVAE ch=32 z_channels=16 V=32 Cvae=4' in ra.stdout
    # every step: the full scale and one smaller side of --pn, drawn from the seeded generator
    steps = iteration_losses(ra.stdout)
    assert len(steps) == 12 and {pn for *_, pn in steps} == {1, 2, 3}
    # the losses fall: the last epoch's train means and the validation MSE of every scale below the first step's
    rec = epoch_records(a)
    first_rec, first_ms, _ = steps[0]
    # measured with ATEN_CPU_CAPABILITY default / avx2 / avx512 x 1 / 2 threads (identical in all six): 0.680, 0.646,
    # 0.645, 0.645 of the first step's losses; bound 0.8
    assert rec[-1]['rec_mse'] < 0.8 * first_rec and rec[-1]['ms_mse'] < 0.8 * first_ms, (steps[0], rec[-1])
    assert rec[-1]['val_MSE'] < 0.8 * first_rec and max(rec[-1]['val_MSE_scales']) < 0.8 * first_rec, rec[-1]
    assert rec[-1]['val_MSE_scales'][-1] == pytest.approx(rec[-1]['val_MSE'])
    assert (a / 'recon' / 'ep0002.png').is_file()

    # killed mid-epoch 2 and resumed: the same weights, usage record, epoch records and scale draws
    rb1 = run_vae(repo_dir, common + ['--local_out_dir_path', str(b)], faults='kill_at=8')
    assert rb1.returncode == 143 and 'rerun the same command to resume' in rb1.stdout, rb1.stdout + rb1.stderr
    rb2 = run_vae(repo_dir, common + ['--local_out_dir_path', str(b)])
    assert rb2.returncode == 0 and '[resume]' in rb2.stdout, rb2.stdout + rb2.stderr
    assert iteration_losses(rb1.stdout) + iteration_losses(rb2.stdout) == steps
    assert epoch_records(b) == rec
    name = 'FlexVAE_ch32z16v32c4.pth'
    ea, eb = (torch.load(o / name, weights_only=True) for o in (a, b))
    assert set(ea) == {'model', 'vae_config'} and ea['vae_config'] == {'norm_groups': 8}
    assert ea['model'].keys() == eb['model'].keys()
    for k in ea['model']:
        assert torch.equal(ea['model'][k], eb['model'][k]), k
    ca, cb = (torch.load(o / 'vae-ckpt-last.pth', weights_only=True) for o in (a, b))
    assert torch.equal(ca['resume']['hits_SV'], cb['resume']['hits_SV'])

    # the export (and the training checkpoint) load as FlexVAR's tokenizer, and train.py --flex trains on it
    for path in (a / name, a / 'vae-ckpt-last.pth'):
        vae = load_vae(str(path), 'cpu', patch_nums=(1, 2, 3, 4))
        assert isinstance(vae, FlexVAE) and (vae.vocab_size, vae.Cvae, vae.ch, vae.z_channels) == (32, 4, 32, 16)
        assert vae.arch == {'ch_mult': (1, 2, 4), 'num_res_blocks': 1, 'norm_groups': 8}
        assert tokenizer_downsample(str(path)) == 4
    assert all(torch.equal(v, ea['model'][k]) for k, v in vae.state_dict().items())
    assert [t.shape for t in vae.img_to_idxBl(torch.zeros(2, 3, 16, 16))] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, 'train.py', '--flex', '--data_path', data, '--vae_ckpt', str(a / name), '--pn',
                        '1_2_3_4', '--depth', '1', '--bs', '32', '--ep', '1', '--seed', '0', '--workers', '0',
                        '--local_out_dir_path', str(tmp_path / 'ar')], cwd=repo_dir, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and '[model] FlexVAR-d1' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    # with 32 GroupNorm groups the keys tell everything: FLEX_TOKENIZER's own format, the weights alone
    sd = {'w': torch.zeros(1)}
    assert FlexRecipe.export(None, sd, {'norm_groups': 32}) == {'model': sd}

    # flags of the other family, and a resume with another family, are refused in one line
    r = run_vae(repo_dir, ['--data_path', data, *TINY, '--codebook_dim', '4', '--local_out_dir_path',
                           str(tmp_path / 'c')])
    assert r.returncode == 2 and "--codebook_dim is FlexVAE's code dimension" in r.stderr, r.stderr
    r = run_vae(repo_dir, ['--data_path', data, *FLEX_TINY, '--attn', 'False', '--local_out_dir_path', str(a)])
    assert r.returncode == 2 and 'always has attention' in r.stderr, r.stderr
    r = run_vae(repo_dir, ['--data_path', data, *TINY, '--ep', '3', '--local_out_dir_path', str(a)])
    assert r.returncode == 1 and 'with --flex True, but this command gives --flex False' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
