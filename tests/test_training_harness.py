"""utils/training.py and utils/dist.py, in-process and fast: the device note, RNG states, sums, stale temporary files,
fingerprints, the optimizer step's non-finite handling, the logger."""
import random
import warnings

import numpy as np
import pytest
import torch

from utils import dist, training
from utils.errors import UserError


# ============================================== --device auto on a machine whose CUDA is unusable =====================
def fake_unusable_cuda(monkeypatch, tmp_path, reason='CUDA initialization: The NVIDIA driver on your system is too '
                                                       'old (found version 11040).'):
    marker = tmp_path / 'nvidia0'
    marker.write_text('')
    monkeypatch.setattr(dist, 'NVIDIA_MARKERS', (str(marker),))
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)

    def is_available():
        if reason:
            warnings.warn(reason, stacklevel=2)
        return False
    monkeypatch.setattr(torch.cuda, 'is_available', is_available)
    return marker


def test_device_auto_says_why_it_falls_back_to_cpu(monkeypatch, tmp_path, capsys):
    marker = fake_unusable_cuda(monkeypatch, tmp_path)
    assert dist.init_distributed('auto') == torch.device('cpu')
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and str(marker) in err and 'driver on your system is too old' in err, err
    assert '--device cpu' in err
    with pytest.raises(UserError, match='too old'):
        dist.init_distributed('cuda')
    # no note where the user chose the CPU, or where there is no NVIDIA device at all
    assert dist.init_distributed('cpu') == torch.device('cpu')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    dist.init_distributed('auto')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    marker.unlink()
    dist.init_distributed('auto')
    assert capsys.readouterr().err == ''


def test_device_note_names_a_cpu_only_build(monkeypatch, tmp_path, capsys):
    fake_unusable_cuda(monkeypatch, tmp_path, reason='')
    monkeypatch.setattr(torch.version, 'cuda', None)
    dist.init_distributed('auto')
    assert 'CPU-only build' in capsys.readouterr().err


# ============================================== pieces of the harness =================================================
def test_rng_state_round_trip_covers_every_stream():
    dev = torch.device('cpu')
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1)          # a cached gauss value is part of Python's state
    state = training.rng_state(dev)
    want = random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item()
    training.seed_everything(5)
    training.set_rng_state(state, dev)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item()) == want
    r = random.Random(3)
    r2 = random.Random()
    r2.setstate(training.tensors_to_random(*training.random_to_tensors(r.getstate())))
    assert r.random() == r2.random()


def test_sums_are_named_and_kept_on_the_device():
    s = training.Sums(('a', 'b', 'c', 'n'), 'cpu')
    s.add('b', torch.tensor([1.0, 2.0]))
    s.inc(n=3, a=0.5)
    assert s.mean_over_ranks() == {'a': 0.5, 'b': 1.0, 'c': 2.0, 'n': 3.0}
    saved = s.state()
    s.zero_()
    s.load(saved)
    assert s.t.tolist() == [0.5, 1.0, 2.0, 3.0]


def test_optimizer_step_skips_non_finite_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    (w.sum() * float('nan')).backward()
    assert training.optimizer_step(opt, None, [w], clip=1.0) is None
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    (w * torch.tensor([3.0, 4.0, 0.0])).sum().backward()
    assert training.optimizer_step(opt, None, [w], clip=1.0) == pytest.approx(5.0)
    assert torch.allclose(w.detach(), torch.tensor([1 - 0.1 * 0.6, 1 - 0.1 * 0.8, 1.0]))      # clipped to norm 1


def test_stale_temporary_files_and_fingerprints(tmp_path):
    for name in ('.ar-ckpt-last.pth.ab_12cd3.tmp', 'ar-ckpt-best.pth.tmp', 'keep.tmp', 'keep.pth'):
        (tmp_path / name).write_bytes(b'12345')
    (tmp_path / 'recon').mkdir()
    (tmp_path / 'recon' / '.ep0001.png.zzzzzzzz.tmp').write_bytes(b'1')
    assert training.remove_stale_temps(str(tmp_path), ('recon',)) == (3, 11)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.pth', 'keep.tmp', 'recon']
    sd = {'a': torch.arange(4.0), 'b': torch.ones(2, 2)}
    fp = training.fingerprint(sd, ['a', 'b'])
    assert fp == training.fingerprint({k: v.clone() for k, v in sd.items()}, ['a', 'b', 'absent'])
    assert fp != training.fingerprint({'a': torch.arange(4.0), 'b': torch.ones(2, 2) * 2}, ['a', 'b'])
    assert fp != training.fingerprint({'a': torch.arange(4.0), 'b': torch.ones(4)}, ['a', 'b'])      # shape counts


HARNESS_SCRIPT = """
import sys
from utils import training
from utils.errors import UserError

class Args:
    device, fp16, local_out_dir_path = 'cpu', 0, sys.argv[1]

def main(args):
    run = training.start(args, 'unit.py')
    run.log.info('[unit] hello')
    run.log.warning('[unit] careful')
    raise UserError('something to fix')

raise SystemExit(training.cli(main, lambda argv: Args(), [], prog='unit.py'))
"""


def test_logger_writes_the_run_folder_and_cli_reports_one_line(tmp_path):
    """A trainer takes over its process (streams, signal handlers): run as a process of its own, as the scripts are."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, '-c', HARNESS_SCRIPT, str(tmp_path)], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}, timeout=300)
    assert r.returncode == 1 and '[unit] hello' in r.stdout and '[unit] careful' in r.stderr, r.stderr
    assert r.stderr.strip().endswith('unit.py: error: something to fix')
    assert '[unit] hello' in (tmp_path / 'stdout.txt').read_text()
    err = (tmp_path / 'stderr.txt').read_text()
    assert 'careful' in err and 'something to fix' in err


def test_the_training_configuration_is_made_once_and_frozen():
    import argparse
    import pickle

    from utils.arg_util import parse_args
    from utils.train_config import Config, config_to_dict, train_config, train_values
    flags = parse_args(['--data_path', 'x', '--pn', '256', '--bs', '16', '--ac', '2'])
    cfg = train_config(flags, train_values(flags, world_size=2), seed=5, num_classes=10)
    assert (cfg.batch_size, cfg.glb_batch_size, cfg.seed, cfg.num_classes, cfg.data_load_reso) == (4, 8, 5, 10, 256)
    with pytest.raises(AttributeError, match='frozen'):
        cfg.seed = 6
    with pytest.raises(AttributeError, match='frozen'):
        del cfg.depth
    assert flags.seed is None and not hasattr(flags, 'batch_size')         # the flags are left as parsed
    saved = config_to_dict(cfg)
    assert saved['patch_nums'] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and saved['pn'] == '1_2_3_4_5_6_8_10_13_16'
    assert all(v is None or isinstance(v, (bool, int, float, str, list)) for v in saved.values())
    assert vars(pickle.loads(pickle.dumps(cfg))) == vars(cfg) and isinstance(cfg, argparse.Namespace)
    assert isinstance(cfg, Config)
    with pytest.raises(ValueError, match='too small'):
        train_values(flags, world_size=16)


@pytest.mark.parametrize('kind', ['var', 'vae'])
def test_the_checkpoint_layout_round_trips_and_keeps_the_published_keys(kind):
    from utils import train_state
    w = {'var_wo_ddp': {'w': torch.ones(1)}, 'vae_local': {'v': torch.zeros(1)}} if kind == 'var' else \
        {'vae_wo_ddp': {'w': torch.ones(1)}, 'disc': {'d': torch.ones(1)}}
    o = {'optimizer': {}, 'scaler': {}, 'grad_clip': 2.0, 'n_gradient_accumulation': 1} if kind == 'var' else \
        {'vae_opt': {}, 'disc_opt': {}}
    s = train_state.Saved(epoch=3, it=7, weights=w, optim=o, config={'depth': 2}, args={'seed': 1}, resume={'g_it': 9})
    ckpt = train_state.pack(kind, s)
    if kind == 'var':       # where models.checkpoint (sampling from a training checkpoint) reads the model
        assert list(ckpt['trainer']) == ['var_wo_ddp', 'vae_local', 'var_opt', 'config']
        assert ckpt['trainer']['var_opt']['grad_clip'] == 2.0 and ckpt['trainer']['config'] == {'depth': 2}
    else:
        assert list(ckpt['trainer']) == ['vae_wo_ddp', 'vae_opt', 'disc', 'disc_opt']
        assert ckpt['vae_config'] == {'depth': 2}
    assert (ckpt['epoch'], ckpt['iter'], ckpt['args'], ckpt['resume']) == (3, 7, {'seed': 1}, {'g_it': 9})
    assert train_state.unpack(kind, ckpt) == s
