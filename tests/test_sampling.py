"""sampling.py, gen_img.py and utils/download.py on tiny random checkpoints (64 px, 4 scales) written here.

What is checked: the official file layout and seeding (every PNG equals ``autoregressive_infer_cfg`` with
``g_seed = seed + i`` converted the official way), the npz, 1 process vs ``torchrun --nproc_per_node=2``
byte for byte, resuming after an interruption without redoing finished images, refusing to mix settings, gen_img's
images and grid, the architecture-mismatch and offline-download messages (one line, exit code 1, no traceback),
and scripts/eval.sh (reference batch checked first, then the README's commands).  Budget: about a minute on 2 cores.
"""
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_main import run_main

import gen_img
import sampling
from models import build_vae_var
from models.checkpoint import load_vae_var
from readme_commands import readme_command
from utils import download, folder_sampling, sampling_utils
from utils.zoo import VAR_TOKENIZER, VIAR_MODEL, var_file

PNS = (1, 2, 3, 4)
NUM_CLASSES = 3


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread, as the script subprocesses (OMP_NUM_THREADS=1) and torchrun use: on CPU float results
    depend on the thread count, and on the 2 shared cores of the test machine several OpenMP threads that
    spin-wait make these tiny models 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """vae.pth (V=1024 so that the default top_k 900 applies unclamped, Cvae 8, ch 32), var.pth (VAR, depth 1) and
    VIAR_MODEL (VIAR, depth 1: 1 pre + 1 implicit + 1 post block), random weights."""
    d = tmp_path_factory.mktemp('ckpts')
    for implicit in (False, True):
        torch.manual_seed(0)
        vae, var = build_vae_var(device='cpu', patch_nums=PNS, V=1024, Cvae=8, ch=32, share_quant_resi=4,
                                 num_classes=NUM_CLASSES, depth=1, use_implicit=implicit, pre_depth=1, post_depth=1)
        with torch.no_grad():   # the fresh-training head (x0.02) gives near-uniform logits, so that every class
            var.head.weight.mul_(50)    # draws the same tokens from a seed: sharpen them to make classes differ
        torch.save(var.state_dict(), d / (VIAR_MODEL if implicit else 'var.pth'))
        if not implicit:
            torch.save(vae.state_dict(), d / 'vae.pth')
    return d


def run_sampling(argv):
    run_main(sampling.main, argv)


def official_batch(var, c, g_seed, B, iters=(10, 10), cfg=1.5):
    """The official sampling.py step for one (class, batch): B images of class c with g_seed, fp32 on CPU,
    converted with permute * 255 and astype(uint8)."""
    with torch.inference_mode():
        img = var.autoregressive_infer_cfg(B=B, label_B=torch.tensor([c] * B), cfg=cfg, top_k=900, top_p=0.96,
                                           g_seed=g_seed, more_smooth=False, iter_left=iters[0], iter_right=iters[1])
        bhwc = img.permute(0, 2, 3, 1).mul_(255).cpu().numpy()
    return bhwc.astype(np.uint8)


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def snapshot(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(folder).glob('*.png'))}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def script_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(Path(sampling.__file__).parent), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------------
def test_flags_parse_booleans_and_defaults():
    a = sampling.parse_args([])
    assert (a.ckpt_path, a.cfg, a.seed, a.top_k, a.top_p, a.num_classes, a.per_class, a.batch_size) == \
        (f'ckpts/{VIAR_MODEL}', 1.5, 1, 900, 0.96, 1000, 50, 25)
    # the tokenizer follows the model's kind (tests/test_flex_scripts.py): VAR's for the published VAR/VIAR files
    assert a.vae_ckpt is None and sampling_utils.default_vae_ckpt(a.ckpt_path) == f'ckpts/{VAR_TOKENIZER}'
    assert a.use_implicit is None and a.more_smooth is False and a.depth is None     # None: as the file says
    for text, want in (('True', True), ('False', False), ('1', True), ('0', False), ('yes', True), ('no', False)):
        assert sampling.parse_args(['--use_implicit', text]).use_implicit is want
        assert sampling.parse_args([f'--use_implicit={text}']).use_implicit is want
    assert sampling.parse_args(['--use_implicit']).use_implicit is True
    readme_gen = readme_command('python gen_img.py')                          # the official README's command
    assert readme_gen == ['python', 'gen_img.py', '--use_implicit', '--save_grid']
    g = gen_img.parse_args(readme_gen[2:])
    assert g.use_implicit is True and g.save_grid is True and g.class_label == ['970']
    assert g.seeds == list(range(10, 20))
    assert gen_img.parse_args(['--class_label', '1', '2', '--seeds', '5']).class_label == ['1', '2']     # or names
    with pytest.raises(SystemExit):
        sampling.parse_args(['--use_implicit', 'maybe'])


def test_units_follow_the_official_layout():
    units = folder_sampling.units_of(1000, 50, 25)
    assert len(units) == 2000
    assert units[0] == (0, 0, list(range(25))) and units[1] == (0, 1, list(range(25, 50)))
    assert units[2 * 970 + 1] == (970, 1, [970 * 50 + 25 + j for j in range(25)])
    # a short last batch: class c holds c*5 .. c*5+4 in batches of 2, 2, 1 (g_seed = seed + 0, 1, 2)
    assert folder_sampling.units_of(2, 5, 2) == [(0, 0, [0, 1]), (0, 1, [2, 3]), (0, 2, [4]),
                                          (1, 0, [5, 6]), (1, 1, [7, 8]), (1, 2, [9])]
    assert sampling_utils.effective_top_k(900, 64) == 64 and sampling_utils.effective_top_k(900, 4096) == 900
    assert sampling_utils.effective_top_k(0, 64) == 0


def test_sampling_writes_official_names_images_and_npz(ckpts, tmp_path):
    out = tmp_path / 'samples'
    run_sampling(['--ckpt_path', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'), '--cfg', '1.5',
                  '--depth', '1', '--sample_dir', str(out), '--use_implicit', 'True', '--iter_left', '3',
                  '--iter_right', '2', '--num_classes', '3', '--per_class', '4', '--batch_size', '2'])
    folder = out / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1'
    names = sorted(p.name for p in folder.glob('*.png'))
    assert names == [f'{k:06d}.png' for k in range(12)]
    assert not [p for p in folder.iterdir() if p.name.endswith('.tmp')]
    pngs = np.stack([read_png(folder / n) for n in names])
    with np.load(str(folder) + '.npz') as z:
        assert list(z.keys()) == ['arr_0']
        arr = z['arr_0']
    assert arr.dtype == np.uint8 and arr.shape == (12, 64, 64, 3)
    assert np.array_equal(arr, pngs)

    # the official seeding: batch i of class c = autoregressive_infer_cfg(B=2, [c]*2, g_seed=1+i), in index order
    _, var = load_vae_var(str(ckpts / 'vae.pth'), str(ckpts / VIAR_MODEL))
    want = np.concatenate([official_batch(var, c, 1 + i, 2, iters=(3, 2)) for c in range(3) for i in range(2)])
    assert np.array_equal(pngs, want)
    # and the images are not all alike: other classes, other seeds and the other images of a batch differ
    assert not np.array_equal(pngs[0], pngs[1]) and not np.array_equal(pngs[0], pngs[2])
    assert not np.array_equal(pngs[0], pngs[4])


def test_iter_tol_is_a_flag_recorded_with_its_own_folder(ckpts, tmp_path):
    """--iter_tol 0 never stops early (same PNGs as the fixed schedule), lands in a folder of its own and is recorded;
    a huge tolerance is the 1->1 schedule."""
    out = tmp_path / 'samples'
    base = ['--ckpt_path', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir', str(out),
            '--use_implicit', 'True', '--iter_left', '3', '--iter_right', '2', '--num_classes', '2', '--per_class', '2',
            '--batch_size', '2']
    run_sampling(base)
    run_sampling(base + ['--iter_tol', '0'])
    plain, tol0 = out / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1', out / f'implicit-{VIAR_MODEL}-cfg-1.5-tol0-seed-1'
    pngs = lambda folder: {p.name: p.read_bytes() for p in sorted(folder.glob('*.png'))}
    assert len(pngs(plain)) == 4 and pngs(plain) == pngs(tol0)
    assert json.loads((tol0 / 'sampling_config.json').read_text())['iter_tol'] == 0
    run_sampling(base + ['--iter_tol', '1e9'])
    _, var = load_vae_var(str(ckpts / 'vae.pth'), str(ckpts / VIAR_MODEL))
    huge = out / f'implicit-{VIAR_MODEL}-cfg-1.5-tol1e+09-seed-1'
    want = np.concatenate([official_batch(var, c, 1, 2, iters=(1, 1)) for c in range(2)])
    assert np.array_equal(np.stack([read_png(huge / f'{k:06d}.png') for k in range(4)]), want)


def test_torchrun_two_processes_give_byte_identical_pngs(ckpts, tmp_path):
    """VAR checkpoint (folder d{depth}-...).  Both runs with one intra-op thread: on CPU, float results depend on
    the thread count (torchrun sets OMP_NUM_THREADS=1), not on how the units are split."""
    common = ['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--num_classes', '3',
              '--per_class', '4', '--batch_size', '2', '--cfg', '2']
    repo = Path(sampling.__file__).parent
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
           '--master_addr=127.0.0.1', f'--master_port={free_port()}', str(repo / 'sampling.py'),
           '--sample_dir', str(tmp_path / 'two')] + common
    r = subprocess.run(cmd, cwd=tmp_path, env=script_env(), check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '2 process(es)' in r.stdout

    assert torch.get_num_threads() == 1
    run_sampling(['--sample_dir', str(tmp_path / 'one')] + common)
    folder = 'd1-var.pth-cfg-2.0-seed-1'
    one, two = snapshot(tmp_path / 'one' / folder), snapshot(tmp_path / 'two' / folder)
    assert list(one) == [f'{k:06d}.png' for k in range(12)] and list(one) == list(two)
    assert all(one[n][2] == two[n][2] for n in one)
    assert (tmp_path / 'one' / 'd1-var.pth-cfg-2.0-seed-1.npz').read_bytes() == \
        (tmp_path / 'two' / 'd1-var.pth-cfg-2.0-seed-1.npz').read_bytes()


def test_interrupted_run_resumes_without_redoing_finished_images(ckpts, tmp_path, monkeypatch, capsys):
    argv = ['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir',
            str(tmp_path), '--num_classes', '3', '--per_class', '4', '--batch_size', '2']
    folder = tmp_path / 'd1-var.pth-cfg-1.5-seed-1'
    npz = Path(str(folder) + '.npz')
    real = folder_sampling.sample_batch
    calls = []

    def interrupted(var, label_B, g_seed, *a, **k):     # Ctrl-C during the 4th batch
        calls.append((int(label_B[0]), g_seed))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(var, label_B, g_seed, *a, **k)

    monkeypatch.setattr(folder_sampling, 'sample_batch', interrupted)
    with pytest.raises(SystemExit) as e:
        run_sampling(argv)
    assert e.value.code == 130 and 'rerun the same command to resume' in capsys.readouterr().err
    assert sorted(p.name for p in folder.glob('*.png')) == [f'{k:06d}.png' for k in range(6)]
    assert not npz.exists() and not [p for p in folder.iterdir() if p.name.endswith('.tmp')]

    # a truncated PNG (as a crash outside this script could leave) and a deleted one are redone, nothing else
    before = snapshot(folder)
    (folder / '000001.png').write_bytes(before['000001.png'][2][:100])
    (folder / '000004.png').unlink()
    calls.clear()
    monkeypatch.setattr(folder_sampling, 'sample_batch', lambda var, label_B, g_seed, *a, **k:
                        calls.append((int(label_B[0]), g_seed)) or real(var, label_B, g_seed, *a, **k))
    run_sampling(argv)
    assert calls == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2)]        # units (0,0) and (1,0) partly, the rest fully
    after = snapshot(folder)
    assert list(after) == [f'{k:06d}.png' for k in range(12)]
    for n in ('000000.png', '000002.png', '000003.png', '000005.png'):
        assert after[n] == before[n]                                  # same inode, mtime and bytes: not rewritten
    for n in ('000001.png', '000004.png'):
        assert after[n][2] == before[n][2] and after[n][0] != before[n][0]   # rewritten with the same pixels
    with np.load(npz) as z:
        assert np.array_equal(z['arr_0'], np.stack([read_png(folder / n) for n in after]))

    # everything done: a rerun samples nothing and leaves the npz alone
    calls.clear()
    npz_stat = npz.stat().st_mtime_ns
    run_sampling(argv)
    assert calls == [] and npz.stat().st_mtime_ns == npz_stat and snapshot(folder) == after


def test_resume_refuses_other_settings(ckpts, tmp_path, capsys):
    argv = ['--ckpt_path', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'), '--use_implicit',
            '--sample_dir', str(tmp_path), '--num_classes', '1', '--per_class', '1', '--batch_size', '1']
    run_sampling(argv + ['--iter_left', '2', '--iter_right', '1'])
    folder = tmp_path / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1'
    png = (folder / '000000.png').read_bytes()
    with pytest.raises(SystemExit) as e:
        run_sampling(argv + ['--iter_left', '4', '--iter_right', '1'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'iter_left=2 (now 4)' in err and '--sample_dir' in err
    assert (folder / '000000.png').read_bytes() == png


def test_sampling_rejects_bad_class_count_and_sample_dir(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_sampling(['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'),
                      '--sample_dir', str(tmp_path)])       # default --num_classes 1000
    assert e.value.code == 1 and '--num_classes 3 or fewer' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

    (tmp_path / 'a_file').write_text('not a folder')
    with pytest.raises(SystemExit) as e:
        run_sampling(['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'),
                      '--sample_dir', str(tmp_path / 'a_file'), '--num_classes', '1', '--per_class', '1'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'pass another --sample_dir' in err and len(err.strip().splitlines()) == 1


BAD_FLAGS = [
    (['--iter_left', '-3'], '--iter_left -3 must be >= 0'),
    (['--iter_right', '-1'], '--iter_right -1 must be >= 0'),
    (['--top_k', '-2'], '--top_k -2 must be >= 0'),
    (['--top_p', '1.5'], '--top_p 1.5 must be in [0, 1]'),
    (['--top_p', '-0.1'], '--top_p -0.1 must be in [0, 1]'),
    (['--cfg', '-1'], '--cfg -1.0 must be a finite number >= 0'),
    (['--cfg', 'nan'], '--cfg nan must be a finite number >= 0'),
]


@pytest.mark.parametrize('argv,expected', BAD_FLAGS + [
    (['--per_class', '0'], '--per_class 0 must be >= 1'),
    (['--batch_size', '0'], '--batch_size 0 must be >= 1'),
    (['--num_classes', '-1'], '--num_classes -1 must be >= 1'),
    (['--seed', str(2 ** 64)], f'--seed {2 ** 64} must be in'),
    (['--seed', str(2 ** 64 - 1)], 'the last batch of a class would use g_seed'),
    (['--iter_left', '-3', '--top_p', '2'], '--top_p 2.0 must be in [0, 1] (0: off); --iter_left -3 must be >= 0'),
])
def test_sampling_rejects_bad_flags_before_loading_or_writing(ckpts, tmp_path, monkeypatch, capsys, argv, expected):
    """D2: one line, status 1, before the device is set up or a model is loaded, nothing written."""
    for name in ('setup_device', 'load_models'):
        monkeypatch.setattr(sampling, name, lambda *a, name=name: pytest.fail(f'{name} called for a bad flag'))
    with pytest.raises(SystemExit) as e:
        run_sampling(['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'),
                      '--sample_dir', str(tmp_path / 's'), '--num_classes', '1'] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and expected in err and err.startswith('sampling.py: error: '), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 's').exists()


@pytest.mark.parametrize('argv,expected', BAD_FLAGS + [
    (['--nrow', '0'], '--nrow 0 must be >= 1'),
    (['--class_label', '3', '-1', '-2'], '--class_label -1 -2 must be >= 0'),
    (['--seeds', '1', str(-2 ** 63 - 1)], f'--seeds {-2 ** 63 - 1} must be in'),
])
def test_gen_img_rejects_bad_flags_before_loading_or_writing(ckpts, tmp_path, monkeypatch, capsys, argv, expected):
    for name in ('setup_device', 'load_chosen'):
        monkeypatch.setattr(gen_img, name, lambda *a, name=name: pytest.fail(f'{name} called for a bad flag'))
    with pytest.raises(SystemExit) as e:
        run_main(gen_img.main, ['--var_ckpt', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'),
                                         '--output_dir', str(tmp_path / 'g')] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and expected in err and err.startswith('gen_img.py: error: '), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'g').exists()


def test_gen_img_rejects_classes_the_checkpoint_lacks_and_an_output_dir_that_is_a_file(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(gen_img.main, ['--var_ckpt', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'),
                                         '--class_label', '0', '3', '--output_dir', str(tmp_path / 'g')])
    err = capsys.readouterr().err
    assert e.value.code == 1 and '--class_label 3 out of range' in err and 'classes 0..2' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'g').exists()
    (tmp_path / 'f').write_text('a file')
    with pytest.raises(SystemExit) as e:
        run_main(gen_img.main, ['--output_dir', str(tmp_path / 'f')])
    assert e.value.code == 1 and 'is a file, not a folder: pass another --output_dir' in capsys.readouterr().err


@pytest.mark.parametrize('script', ['sampling.py', 'gen_img.py'])
def test_scripts_reject_a_negative_iteration_count_without_a_traceback(tmp_path, script):
    """D2 as a user meets it: a fresh folder, no checkpoints, a bad flag: one line, nothing created."""
    r = subprocess.run([sys.executable, str(Path(sampling.__file__).parent / script), '--iter_left', '-3'],
                       cwd=tmp_path, env=script_env(), check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip() == f'{script}: error: --iter_left -3 must be >= 0 (implicit iterations at the first scale)'
    assert not list(tmp_path.iterdir())


def test_a_recorded_config_without_images_is_replaced(ckpts, tmp_path, capsys):
    """D2: a config left by a run that stopped before its first image does not block the corrected command."""
    argv = ['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir',
            str(tmp_path), '--num_classes', '1', '--per_class', '1']
    folder = tmp_path / 'd1-var.pth-cfg-1.5-seed-1'
    folder.mkdir()
    config = {'ckpt': 'var.pth', 'top_k': 5, 'cfg': 1.5, 'seed': 1}
    (folder / folder_sampling.CONFIG_NAME).write_text(json.dumps(config))
    run_sampling(argv)
    assert (folder / '000000.png').is_file() and Path(str(folder) + '.npz').is_file()
    record = json.loads((folder / folder_sampling.CONFIG_NAME).read_text())
    assert record['top_k'] == 900 and 'ckpt_sha256' in record and 'vae_sha256' in record


def perturbed_copy(src, dst, key):
    """``src`` trained a little further: the same state dict with ``key`` nudged, saved at ``dst``."""
    sd = torch.load(src, weights_only=True)
    sd[key] = sd[key] + 0.01
    torch.save(sd, dst)


def test_resume_refuses_images_of_other_weights_under_the_same_file_name(ckpts, tmp_path, monkeypatch, capsys):
    """D1: sampling local_output/ar-ckpt-last.pth, training on, and sampling again must not reuse the old images
    (nor call the old npz up to date); neither for a tokenizer changed in place."""
    run_dir = tmp_path / 'local_output'
    run_dir.mkdir()
    ckpt, vae = run_dir / 'ar-ckpt-last.pth', run_dir / 'vae.pth'
    ckpt.write_bytes((ckpts / 'var.pth').read_bytes())
    vae.write_bytes((ckpts / 'vae.pth').read_bytes())
    argv = ['--ckpt_path', str(ckpt), '--vae_ckpt', str(vae), '--sample_dir', str(tmp_path / 's'), '--num_classes',
            '2', '--per_class', '2', '--batch_size', '2']
    run_sampling(argv)
    folder = tmp_path / 's' / 'd1-ar-ckpt-last.pth-cfg-1.5-seed-1'
    npz = Path(str(folder) + '.npz')
    record = json.loads((folder / folder_sampling.CONFIG_NAME).read_text())
    assert record['ckpt_sha256'] == sampling_utils.weights_sha256(str(ckpt))
    assert record['vae_sha256'] == sampling_utils.weights_sha256(str(vae))
    assert record['npz_crc32'] == zipfile.ZipFile(npz).getinfo('arr_0.npy').CRC
    pngs, npz_bytes, npz_mtime = snapshot(folder), npz.read_bytes(), npz.stat().st_mtime_ns
    capsys.readouterr()

    calls = []
    real = folder_sampling.sample_batch
    monkeypatch.setattr(folder_sampling, 'sample_batch', lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    for path, key, what in ((ckpt, 'head.weight', 'model checkpoint'),
                            (vae, 'decoder.conv_out.weight', 'tokenizer checkpoint')):
        original = path.read_bytes()
        perturbed_copy(path, path, key)
        with pytest.raises(SystemExit) as e:
            run_sampling(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert f'holds images sampled from other weights than the {what} {str(path)!r} now holds' in err
        assert 'pass another --sample_dir or delete the folder' in err
        assert calls == [] and snapshot(folder) == pngs
        assert npz.read_bytes() == npz_bytes and npz.stat().st_mtime_ns == npz_mtime
        path.write_bytes(original)

    # the same weights again (rewritten, same bytes): resumed, nothing to do, the npz left alone
    run_sampling(argv)
    assert calls == [] and snapshot(folder) == pngs and npz.stat().st_mtime_ns == npz_mtime
    assert f'{npz} is up to date' in capsys.readouterr().out

    # images whose config records no fingerprint of the weights, or no config at all: nothing says which weights
    # made them, so they are refused as well, the folder left as it is
    old = {k: v for k, v in record.items() if not k.endswith('_sha256')}
    (folder / folder_sampling.CONFIG_NAME).write_text(json.dumps(old))
    for missing_config in (False, True):
        if missing_config:
            (folder / folder_sampling.CONFIG_NAME).unlink()
        with pytest.raises(SystemExit) as e:
            run_sampling(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and 'pass another --sample_dir or delete the folder' in err, err
        assert ('no readable sampling_config.json' in err) is missing_config, err
        assert calls == [] and snapshot(folder) == pngs and npz.stat().st_mtime_ns == npz_mtime


def test_an_npz_that_is_not_the_one_packed_is_packed_again(ckpts, tmp_path, capsys):
    """D1, the npz: a newer npz of the right shape that is not the file this folder's run packed (another run's,
    copied in) is not called up to date."""
    argv = ['--ckpt_path', str(ckpts / 'var.pth'), '--vae_ckpt', str(ckpts / 'vae.pth'), '--sample_dir',
            str(tmp_path), '--num_classes', '1', '--per_class', '3', '--batch_size', '3']
    run_sampling(argv)
    folder = tmp_path / 'd1-var.pth-cfg-1.5-seed-1'
    npz = Path(str(folder) + '.npz')
    with np.load(npz) as z:
        good = z['arr_0']
    np.savez(npz, arr_0=np.zeros_like(good))       # newer than every PNG, 3 uint8 images of the right size
    capsys.readouterr()
    run_sampling(argv)
    assert 'up to date' not in capsys.readouterr().out
    with np.load(npz) as z:
        assert np.array_equal(z['arr_0'], good)


def test_sampler_kwargs_come_from_the_flags():
    """The one place flags become autoregressive_infer_cfg keywords; flags added later slot in by name."""
    args = sampling.parse_args(['--more_smooth', '--top_k', '5000', '--iter_left', '3'])
    kw = sampling_utils.sampler_kwargs(args)
    assert kw == {'cfg': 1.5, 'top_k': 5000, 'top_p': 0.96, 'more_smooth': True, 'iter_left': 3, 'iter_right': 10}

    class Model:
        V = 1024
    assert sampling_utils.sampler_kwargs(args, Model())['top_k'] == 1024
    args.iter_tol = None                # a flag another script adds: passed and checked once set
    assert 'iter_tol' not in sampling_utils.sampler_kwargs(args)
    args.iter_tol = 0.01
    assert sampling_utils.sampler_kwargs(args)['iter_tol'] == 0.01
    args.iter_tol = -1.0
    with pytest.raises(sampling_utils.SamplingError, match='--iter_tol -1.0 must be >= 0'):
        sampling_utils.check_args(args)


def test_gen_img_writes_images_and_grid(ckpts, tmp_path):
    run_main(gen_img.main, ['--use_implicit', '--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt',
                                     str(ckpts / 'vae.pth'), '--class_label', '0', '2', '--seeds', '3', '4', '5',
                                     '--save_grid', '--nrow', '3', '--output_dir', str(tmp_path)])
    out = tmp_path / 'viar'
    names = sorted(p.name for p in out.glob('*.png'))
    singles = [f'class{c}_seed{s}.png' for c in (0, 2) for s in (3, 4, 5)]
    assert names == sorted(singles + ['class0_2_seeds3_4_5_grid.png'])
    # each image is the official gen_img.py call: B=1, label [c], g_seed = seed
    _, var = load_vae_var(str(ckpts / 'vae.pth'), str(ckpts / VIAR_MODEL))
    imgs = [read_png(out / n) for n in singles]
    assert np.array_equal(imgs[4], official_batch(var, 2, 4, 1)[0])
    # the grid: 3 per row, 2 px white padding, classes in order then seeds
    grid = read_png(out / 'class0_2_seeds3_4_5_grid.png')
    assert grid.shape == (2 + 2 * 66, 2 + 3 * 66, 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    for k, img in enumerate(imgs):
        r, c = divmod(k, 3)
        assert np.array_equal(grid[2 + 66 * r: 66 * (r + 1), 2 + 66 * c: 66 * (c + 1)], img)


def test_architecture_mismatch_messages(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(gen_img.main, ['--use_implicit', '--var_ckpt', str(ckpts / 'var.pth'), '--vae_ckpt',
                                         str(ckpts / 'vae.pth'), '--output_dir', str(tmp_path / 'g')])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'holds a VAR model' in err and 'drop --use_implicit' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'g').exists()

    for argv, expected in ((['--use_implicit', 'False'], 'add --use_implicit'),     # not given: as the file says
                           (['--use_implicit', '--depth', '30'], 'pass --depth 1')):
        with pytest.raises(SystemExit) as e:
            run_sampling(['--ckpt_path', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'),
                          '--sample_dir', str(tmp_path / 's'), '--num_classes', '1'] + argv)
        assert e.value.code == 1 and expected in capsys.readouterr().err
    assert not (tmp_path / 's').exists()


def test_missing_default_checkpoint_offline_gives_the_download_message(tmp_path):
    r = subprocess.run([sys.executable, str(Path(gen_img.__file__)), '--use_implicit'], cwd=tmp_path,
                       env=script_env(), check=False, capture_output=True, text=True, timeout=120)
    url = f'https://huggingface.co/mobiushy/VIAR/resolve/main/{VIAR_MODEL}'
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    # from another folder the default is the repository's ckpts/ (not <cwd>/ckpts): the message names it
    want = Path(gen_img.__file__).resolve().parent / 'ckpts' / VIAR_MODEL
    assert f"'{want}'" in r.stderr and url in r.stderr and f'wget -O {want} {url}' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'gen_images').exists() and not (tmp_path / 'ckpts').exists()


def test_ensure_checkpoint_downloads_only_default_paths(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.chdir(tmp_path)
    got = []

    def fake_download(repo_id, filename, local_dir, **kw):
        got.append((repo_id, filename, local_dir))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'weights')
        return str(path)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    assert download.ensure_checkpoint(f'ckpts/{var_file(16)}') == f'ckpts/{var_file(16)}'
    assert download.ensure_checkpoint(f'./ckpts/{VIAR_MODEL}') == f'./ckpts/{VIAR_MODEL}'
    assert got == [('FoundationVision/var', var_file(16), 'ckpts'), ('mobiushy/VIAR', VIAR_MODEL, 'ckpts')]
    assert download.ensure_checkpoint(f'ckpts/{VIAR_MODEL}') == f'ckpts/{VIAR_MODEL}' and len(got) == 2   # present
    for path in (f'elsewhere/{VIAR_MODEL}', 'ckpts/mine.pth'):       # not a default place: never downloaded
        with pytest.raises(download.MissingCheckpointError, match='does not exist'):
            download.ensure_checkpoint(path)
    assert len(got) == 2
    (tmp_path / 'ckpts' / var_file(20)).mkdir()
    with pytest.raises(download.MissingCheckpointError,
                       match=f"'ckpts/{var_file(20)}' is a directory: pass the checkpoint"):
        download.ensure_checkpoint(f'ckpts/{var_file(20)}')
    assert len(got) == 2

    def failing(**kw):
        raise OSError('connection refused')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda *a, **k: failing())
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    with pytest.raises(download.MissingCheckpointError) as e:
        download.ensure_checkpoint(f'ckpts/{VAR_TOKENIZER}')
    msg = str(e.value)
    assert 'connection refused' in msg and download.hf_url(VAR_TOKENIZER) in msg
    assert msg.count('\n') == 0 and f'wget -O ckpts/{VAR_TOKENIZER}' in msg


def test_eval_sh_checks_the_reference_batch_then_runs_the_readme_commands(tmp_path):
    """scripts/eval.sh with a stand-in interpreter that records its command lines (nothing is sampled)."""
    repo = Path(sampling.__file__).parent
    log = tmp_path / 'calls.txt'
    stub = tmp_path / 'python'
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    ref = tmp_path / 'data' / 'VIRTUAL_imagenet256_labeled.npz'

    def run(**extra):
        env = dict(os.environ, PYTHON=str(stub), REF_BATCH=str(ref), **extra)
        return subprocess.run(['bash', str(repo / 'scripts' / 'eval.sh')], cwd=tmp_path, env=env,
                              check=False, capture_output=True, text=True, timeout=60)

    r = run()
    url = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz'
    assert r.returncode == 1 and str(ref) in r.stderr and f'wget -O {ref} {url}' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not log.exists()     # checked before any sampling

    ref.mkdir(parents=True)                                                 # a folder where the file should be
    r = run()
    assert r.returncode == 1
    assert r.stderr == f'error: reference batch {ref} is a directory: set REF_BATCH to the .npz file\n'
    assert not log.exists()
    ref.rmdir()
    ref.write_bytes(b'stand-in')
    # what README.md says `bash scripts/eval.sh` runs (the official VIAR README's commands; REF_BATCH set here)
    assert 'bash scripts/eval.sh' in (repo / 'README.md').read_text()
    sample_cmd = ' '.join(readme_command('python sampling.py')[1:])
    eval_cmd = ' '.join(readme_command('python evaluator.py')[1:]).replace('data/VIRTUAL_imagenet256_labeled.npz',
                                                                           str(ref))
    assert sample_cmd == (f'sampling.py --ckpt_path ckpts/{VIAR_MODEL} --vae_ckpt ckpts/{VAR_TOKENIZER} --cfg 1.5 '
                          '--depth 30 --sample_dir samples --use_implicit True --iter_left 10 --iter_right 10')
    assert eval_cmd == f'evaluator.py {ref} samples/implicit-{VIAR_MODEL}-cfg-1.5-seed-1.npz'
    r = run()
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [sample_cmd, eval_cmd]

    log.unlink()
    r = run(NPROC='2', MASTER_PORT='29999')
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines() == [
        '-m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29999 '
        + sample_cmd,
        eval_cmd]
