"""The last bad inputs and faults of two hostile probes: a full disk while saving, a missing TensorFlow, odd images
(16-bit, EXIF-rotated, macOS side files), class names, flag ranges, paths from another folder, scripts run as files."""
import errno
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_main import run_main

import evaluator
import sampling
from models import build_vae_var
from models.checkpoint import CheckpointError, class_names, resolve_class_labels
from utils import download, folder_sampling, misc, sampling_utils, training
from utils.arg_util import parse_args, parse_vae_args
from utils.data import build_dataset, open_rgb, scan_images
from utils.editing import load_image
from utils.errors import EXIT_PREEMPTED, run_cli
from utils.zoo import VAR_TOKENIZER, VIAR_MODEL

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def run_script(script, argv):
    """(exit status, stdout, stderr) of ``python SCRIPT ARGV`` (a trainer takes over its process: not in-process)."""
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                       env={**ENV, 'PYTHONWARNINGS': 'ignore'}, timeout=600)
    return r.returncode, r.stdout, r.stderr


# ============================================== a full disk ===========================================================
class _FillsUp:
    """A file object whose writes fail with ENOSPC after ``room`` bytes (what a full disk does)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        n = len(memoryview(b).cast('B'))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_after(monkeypatch, room: int):
    real = os.fdopen
    monkeypatch.setattr(misc.os, 'fdopen', lambda fd, mode: _FillsUp(real(fd, mode), room))


def assert_one_disk_full_line(msg: str, path: Path):
    assert '\n' not in msg and msg.startswith('disk full while writing') and str(path) in msg, msg
    assert 'MiB free' in msg and f'the previous {path.name} is kept unchanged' in msg, msg


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save fails inside its zip writer (a RuntimeError chained to the OSError): one line naming the file, the
    free space and that the previous checkpoint is kept; no temporary file is left."""
    path = tmp_path / 'ar-ckpt-last.pth'
    training.write_checkpoint({'w': torch.zeros(10)}, str(path))
    before = path.read_bytes()
    fill_disk_after(monkeypatch, 5000)
    with pytest.raises(misc.DiskFullError) as e:
        training.write_checkpoint({'w': torch.zeros(100_000)}, str(path))
    assert_one_disk_full_line(str(e.value), path)
    assert 'rerun the same command' in str(e.value)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['ar-ckpt-last.pth']
    # the same for a tokenizer export, the sampler's npz and every other atomic write
    for write in (lambda p: misc.save_atomic({'a': torch.ones(50_000)}, p),
                  lambda p: misc.atomic_write_bytes(b'x' * 100_000, p)):
        with pytest.raises(misc.DiskFullError) as e:
            write(tmp_path / 'vae_ch32v16z8.pth')
        assert 'no vae_ch32v16z8.pth was written' in str(e.value) and sorted(os.listdir(tmp_path)) == [path.name]


def test_a_full_disk_while_packing_the_npz(tmp_path, monkeypatch):
    folder = tmp_path / 'run'
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f'{i:06d}.png')
    fill_disk_after(monkeypatch, 300)
    with pytest.raises(misc.DiskFullError) as e:
        misc.create_npz_from_sample_folder(str(folder))
    assert 'no run.npz was written' in str(e.value) and sorted(os.listdir(tmp_path)) == ['run']


def test_a_full_tmpfs(tmp_path):
    """The real thing where this machine lets the test mount a 1 MiB tmpfs (root in a container); else skipped."""
    mnt = tmp_path / 'small'
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f'cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})')
    try:
        path = mnt / 'ar-ckpt-last.pth'
        training.write_checkpoint({'w': torch.zeros(1000)}, str(path))
        with pytest.raises(misc.DiskFullError) as e:
            training.write_checkpoint({'w': torch.zeros(1_000_000)}, str(path))
        assert_one_disk_full_line(str(e.value), path)
        assert os.listdir(mnt) == ['ar-ckpt-last.pth'] and torch.load(path, weights_only=True)['w'].numel() == 1000
    finally:
        subprocess.run(['umount', str(mnt)], check=False)


# ============================================== evaluator =============================================================
@pytest.fixture()
def npz_pair(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ('ref.npz', 'sample.npz'):
        np.savez(tmp_path / name, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
        paths.append(str(tmp_path / name))
    return paths


def run_evaluator_without_tensorflow(tmp_path, *argv):
    shim = tmp_path / 'shim'
    shim.mkdir(exist_ok=True)
    (shim / 'tensorflow.py').write_text("raise ImportError('No module named tensorflow (test shim)')\n")
    env = {**ENV, 'PYTHONPATH': str(shim), 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
    return subprocess.run([sys.executable, str(REPO / 'evaluator.py'), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_evaluator_without_tensorflow_says_what_to_install_before_any_download(tmp_path, npz_pair):
    r = run_evaluator_without_tensorflow(tmp_path, *npz_pair)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'requirements-eval.txt' in r.stderr and 'Traceback' not in r.stderr
    assert 'download' not in r.stderr.lower() and not (tmp_path / 'cache').exists()      # nothing fetched first


def test_evaluator_checks_its_output_files_before_computing(tmp_path, npz_pair):
    for flag, bad in (('--json', str(tmp_path / 'missing' / 'r.json')), ('--json', str(tmp_path))):
        r = run_evaluator_without_tensorflow(tmp_path, *npz_pair, flag, bad)
        assert r.returncode == 1 and f'{flag} {bad}' in r.stderr and 'requirements-eval' not in r.stderr, r.stderr
    r = run_evaluator_without_tensorflow(tmp_path, *npz_pair, '--save_ref_stats', '--json', str(tmp_path / 'r.json'))
    assert r.returncode == 1 and 'requirements-eval.txt' in r.stderr       # writable: then the TensorFlow check
    assert not any(n.endswith(('.tmp', '.writable')) for n in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_evaluator_stats_cache_on_a_full_disk_is_one_warning(tmp_path, npz_pair, monkeypatch, capsys):
    fill_disk_after(monkeypatch, 100)
    stats = {k: np.zeros((4, 4)) for k in evaluator.STAT_KEYS}
    assert not evaluator.save_stats(tmp_path / 'ref_stats.npz', np.zeros((8, 4)), stats, npz_pair[0], 'abc')
    err = capsys.readouterr().err
    assert 'disk full while writing' in err and 'MiB free' in err and len(err.strip().splitlines()) == 1
    assert not any(n.endswith('.tmp') for n in os.listdir(tmp_path))


# ============================================== images ================================================================
def test_16_bit_png_and_exif_rotation_are_read_as_they_look(tmp_path):
    grey16 = np.full((6, 10), 32768, np.uint16)
    grey16[:, :5] = 65535
    Image.fromarray(grey16).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I')
    rgb = np.asarray(open_rgb(str(tmp_path / 'deep.png')))
    assert rgb.shape == (6, 10, 3) and rgb[0, 0].tolist() == [255] * 3 and rgb[0, 9].tolist() == [128] * 3

    photo = np.zeros((20, 40, 3), np.uint8)
    photo[:, :20] = 255                     # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6                        # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo).save(tmp_path / 'phone.jpg', exif=exif, quality=95)
    shown = np.asarray(open_rgb(str(tmp_path / 'phone.jpg')))
    assert shown.shape == (40, 20, 3) and shown[:15].mean() > 200 and shown[25:].mean() < 50    # white on top
    assert scan_images([str(tmp_path / 'deep.png'), str(tmp_path / 'phone.jpg')]) == []
    assert load_image(tmp_path / 'phone.jpg').size == (20, 40)      # the edit tool's (and the app's) inputs too
    assert np.asarray(load_image(tmp_path / 'deep.png'))[0, 9].tolist() == [128] * 3


def make_data(root: Path, n: int = 3, classes=('cats', 'dogs')) -> Path:
    for split in ('train', 'val'):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16, 3), 60 * c + 20 * i, np.uint8)).save(d / f'{i}.png')
    return root


def test_macos_side_files_are_skipped_and_bad_files_counted_once(tmp_path):
    data = make_data(tmp_path / 'd')
    (data / 'train' / 'cats' / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (data / 'train' / 'cats' / '.DS_Store').write_bytes(b'junk')
    classes, train_set, _ = build_dataset(str(data), 16, skip_bad=True, mid_reso=1.0)
    assert classes == ['cats', 'dogs'] and len(train_set) == 6
    assert not any(os.path.basename(p).startswith('.') for p, _ in train_set.samples)
    (data / 'train' / 'dogs' / '1.png').write_bytes(b'not a png')
    for _ in range(3):                      # read three times (three epochs, workers ...): one bad file
        for i in range(len(train_set)):
            train_set[i]
    assert [train_set.samples[i][0] for i in train_set.bad_indices()] == [str(data / 'train' / 'dogs' / '1.png')]


def test_check_data_lists_empty_class_folders_with_the_bad_images(tmp_path, capsys):
    data = make_data(tmp_path / 'd')
    (data / 'train' / 'birds').mkdir()
    (data / 'train' / 'cats' / '2.png').write_bytes(b'broken')
    out = tmp_path / 'out'
    rc, _, err = run_script('train_vae.py', ['--data_path', data, '--check_data', '--local_out_dir_path', out, '--pn',
                                             '1_2', '--ch', '32', '--ch_mult', '1_2', '--norm_groups', '8', '--workers',
                                             '0'])
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert '1 of 12 images cannot be decoded and 1 class folder(s) hold no images' in err, err
    listed = (out / 'bad_images.txt').read_text()
    assert str(data / 'train' / 'birds') in listed and str(data / 'train' / 'cats' / '2.png') in listed
    assert not (out / 'recon').exists()
    with pytest.raises(Exception, match='Found no valid file for the classes birds'):
        build_dataset(str(data), 16)


VAE_FLAGS = ['--pn', '1_2', '--ch', '32', '--ch_mult', '1_2', '--norm_groups', '8', '--vocab_size', '16',
             '--z_channels', '8', '--bs', '2', '--ep', '1', '--workers', '0', '--mid_reso', '1.0', '--n_vis', '2']


def test_train_vae_exports_nothing_before_the_first_step(tmp_path, capsys):
    data = make_data(tmp_path / 'd')
    for p in (data / 'train').rglob('*.png'):
        p.write_bytes(b'broken')
    out = tmp_path / 'out'
    rc, _, err = run_script('train_vae.py', ['--data_path', data, '--local_out_dir_path', out, *VAE_FLAGS])
    assert rc == 1 and 'nothing was trained, no checkpoint written' in err and '--check_data' in err, err
    assert not list(out.glob('*.pth'))
    # an unreadable validation image of the reconstruction grid, read before step 1: the same hints
    data2 = make_data(tmp_path / 'd2')
    (data2 / 'val' / 'cats' / '0.png').write_bytes(b'broken')
    rc, _, err = run_script('train_vae.py', ['--data_path', data2, '--local_out_dir_path', tmp_path / 'o2', *VAE_FLAGS])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and '--check_data' in err and '--skip_bad_images' in err


# ============================================== flags =================================================================
@pytest.mark.parametrize('parse, argv, says', [
    (parse_args, ['--tblr', '-1'], '--tblr must be a finite number > 0, got -1.0'),
    (parse_args, ['--tblr', 'nan'], '--tblr must be a finite number > 0, got nan'),
    (parse_args, ['--twd', 'inf'], '--twd must be a finite number >= 0'),
    (parse_args, ['--mid_reso', '0.5'], '--mid_reso must be a finite number >= 1'),
    (parse_args, ['--workers', '-5'], '--workers must be >= -1'),
    (parse_args, ['--ls', '1'], '--ls must be in [0, 1)'),
    (parse_args, ['--wp', '-1'], '--wp must be a finite number of epochs >= 0'),
    (parse_vae_args, ['--data_path', 'x', '--lr', '-1'], '--lr must be a finite number > 0'),
    (parse_vae_args, ['--data_path', 'x', '--lr', 'inf'], '--lr must be a finite number > 0'),
    (parse_vae_args, ['--data_path', 'x', '--mid_reso', '0.5'], '--mid_reso must be a finite number >= 1'),
    (parse_vae_args, ['--data_path', 'x', '--workers', '-5'], '--workers must be >= -1'),
    (parse_vae_args, ['--data_path', 'x', '--clip', 'nan'], '--clip must be a finite number >= 0'),
    (parse_vae_args, ['--data_path', 'x', '--l1', 'nan'], '--l1 must be a finite number >= 0'),
])
def test_numeric_training_flags_are_checked_at_start(parse, argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(says) or says in err.splitlines()[-1], err


def test_cfg_inf_is_refused_as_not_finite():
    args = sampling.parse_args(['--cfg', 'inf'])
    with pytest.raises(sampling_utils.SamplingError, match='--cfg inf must be a finite number >= 0'):
        sampling_utils.check_args(args)


def test_box_with_a_leading_minus_gets_the_range_error():
    from scripts import edit
    args = edit.parse_args(['--input_img', 'a.png', '--box', '-0.2,0,1,1'])
    assert args.box == '-0.2,0,1,1'
    with pytest.raises(Exception, match='outside the image'):
        edit.check_flags(args)


# ============================================== class names ===========================================================
@pytest.fixture(scope='module')
def named_ckpts(tmp_path_factory):
    """A tiny VAR saved as a train.py checkpoint with class names, and its tokenizer."""
    d = tmp_path_factory.mktemp('named')
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', patch_nums=(1, 2), V=64, Cvae=8, ch=32, share_quant_resi=4,
                             num_classes=3, depth=1, use_implicit=True, pre_depth=1, post_depth=1)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save({'trainer': {'var_wo_ddp': var.state_dict(), 'config': {'class_names': ['cats', 'dogs', 'owls']}},
                'args': {}, 'epoch': 1}, d / 'ar-ckpt-last.pth')
    torch.save(var.state_dict(), d / 'bare.pth')
    return d


def test_class_names_are_read_and_accepted_by_name(named_ckpts, tmp_path, capsys):
    obj = torch.load(named_ckpts / 'ar-ckpt-last.pth', weights_only=True)
    assert class_names(obj) == ('cats', 'dogs', 'owls') and class_names({'x': torch.zeros(1)}) is None
    assert resolve_class_labels(['owls', '0'], ('cats', 'dogs', 'owls'), 3) == [2, 0]
    with pytest.raises(CheckpointError, match="'cows' is not a class of"):
        resolve_class_labels(['cows'], ('cats', 'dogs', 'owls'), 3)
    with pytest.raises(CheckpointError, match='records no class names'):
        resolve_class_labels(['cats'], None, 3)
    import gen_img
    # no --use_implicit for this VIAR checkpoint: the architecture is as the file says
    run_main(gen_img.main, ['--var_ckpt', str(named_ckpts / 'ar-ckpt-last.pth'), '--vae_ckpt',
                                     str(named_ckpts / 'vae.pth'), '--class_label', 'owls', 'cats', '--seeds', '0',
                                     '--output_dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert '0 cats, 1 dogs, 2 owls' in out
    assert sorted(p.name for p in (tmp_path / 'ar-ckpt-last').iterdir()) == ['class0_seed0.png', 'class2_seed0.png']
    with pytest.raises(SystemExit):     # --use_implicit False is still checked against the file
        run_main(gen_img.main, ['--var_ckpt', str(named_ckpts / 'bare.pth'), '--vae_ckpt',
                                         str(named_ckpts / 'vae.pth'), '--use_implicit', 'False', '--seeds', '0',
                                         '--class_label', '1', '--output_dir', str(tmp_path)])
    assert 'add --use_implicit' in capsys.readouterr().err


def test_sampling_on_a_full_disk_is_one_line(named_ckpts, tmp_path, monkeypatch, capsys):
    fill_disk_after(monkeypatch, 2000)          # the config fits, an image does not
    with pytest.raises(SystemExit) as e:
        run_main(sampling.main, ['--ckpt_path', str(named_ckpts / 'ar-ckpt-last.pth'), '--vae_ckpt',
                                           str(named_ckpts / 'vae.pth'), '--sample_dir', str(tmp_path), '--num_classes',
                                           '1', '--per_class', '1'])
    out, err = capsys.readouterr()
    err = '\n'.join(line for line in err.splitlines() if 'batch/s' not in line).strip()      # no progress bar
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and err.startswith('sampling.py: error: '), err
    assert 'disk full while writing' in err and '000000.png' in err and 'no 000000.png was written' in err, err
    assert 'MiB free' in err and 'rerun the same command to resume' in err
    assert '0 cats' in out                      # the checkpoint's class names are shown
    folder = tmp_path / 'implicit-ar-ckpt-last.pth-cfg-1.5-seed-1'     # VIAR, as the file says
    assert sorted(os.listdir(folder)) == [folder_sampling.CONFIG_NAME]


def test_train_py_prints_and_stores_the_class_names(tmp_path, capsys):
    """train.py on a folder of named classes: the labels are printed at start and stored in the checkpoint, whose
    samples gen_img.py then draws by name."""
    import gen_img
    from models import VQVAE
    data = make_data(tmp_path / 'd', n=2, classes=('cats', 'dogs', 'owls'))
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=16, z_channels=8, ch=32, v_patch_nums=(1, 2, 4, 8), ch_mult=(1, 2), norm_groups=8)
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    out = tmp_path / 'run'
    rc, stdout, err = run_script('train.py', ['--data_path', data, '--vae_ckpt', tmp_path / 'vae.pth', '--pn',
                                              '1_2_4_8', '--depth', '1', '--bs', '2', '--ep', '1', '--seed', '0',
                                              '--workers', '0', '--mid_reso', '1', '--local_out_dir_path', out])
    assert rc == 0, err
    assert '[data] classes (label: folder; stored in the checkpoint): 0 cats, 1 dogs, 2 owls' in stdout
    ckpt = torch.load(out / 'ar-ckpt-last.pth', weights_only=True)
    assert class_names(ckpt) == ('cats', 'dogs', 'owls')
    run_main(gen_img.main, ['--var_ckpt', str(out / 'ar-ckpt-last.pth'), '--vae_ckpt',
                                     str(tmp_path / 'vae.pth'), '--class_label', 'dogs', '--seeds', '3',
                                     '--output_dir', str(tmp_path / 'g')])
    assert (tmp_path / 'g' / 'ar-ckpt-last' / 'class1_seed3.png').is_file()


# ============================================== sampling: SIGTERM, fingerprints =======================================
def test_sigterm_while_sampling_says_that_the_same_command_resumes(capsys):
    import time

    def work():
        with sampling.stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(work, 'sampling.py') == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert out.strip() == ('[sampling.py] stopped: SIGTERM: every image written so far is kept; rerun the same '
                           'command to resume')
    assert signal.getsignal(signal.SIGTERM) is before


def test_weights_sha256_covers_the_whole_file_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    big = tmp_path / 'big.pth'
    data = bytearray(np.random.default_rng(0).integers(0, 256, 20 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    full = sampling_utils.weights_sha256(str(big))
    data[10 << 20] ^= 1                     # a fine-tune that changes only the middle of the file
    big.write_bytes(data)
    assert sampling_utils.weights_sha256(str(big)) != full
    # the cache: a file of the same path, size, times and inode is not hashed again; a touched one is
    cache_file = tmp_path / 'cache' / 'viar' / 'weights_sha256.json'
    cache = json.loads(cache_file.read_text())
    assert list(cache.values()) == [sampling_utils.weights_sha256(str(big))]          # one entry per file
    cache_file.write_text(json.dumps({k: 'f' * 64 for k in cache}))
    assert sampling_utils.weights_sha256(str(big)) == 'f' * 64                           # read from the cache
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert sampling_utils.weights_sha256(str(big)) == __import__('hashlib').sha256(bytes(data)).hexdigest()


def test_sample_folder_settings_are_checked_against_the_whole_file_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    ckpt, vae = tmp_path / 'm.pth', tmp_path / 'v.pth'
    ckpt.write_bytes(b'model' * 100)
    vae.write_bytes(b'vae' * 100)
    folder = tmp_path / 'f'
    folder.mkdir()
    _, weights = folder_sampling.checkpoint_identity(str(ckpt), str(vae))
    assert set(weights) == {'ckpt_sha256', 'vae_sha256'}
    record = folder_sampling.check_or_record_settings(str(folder), {'seed': 1}, weights)   # no image yet: recorded
    (folder / '000000.png').write_bytes(b'png')
    assert folder_sampling.check_or_record_settings(str(folder), {'seed': 1}, weights) == record
    ckpt.write_bytes(b'MODEL' * 100)        # other weights under the same name
    _, weights2 = folder_sampling.checkpoint_identity(str(ckpt), str(vae))
    with pytest.raises(sampling_utils.SamplingError, match='other weights than the model checkpoint') as e:
        folder_sampling.check_or_record_settings(str(folder), {'seed': 1}, weights2)
    assert 'tokenizer' not in str(e.value)


# ============================================== paths and scripts =====================================================
def test_default_checkpoints_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert download.resolve_default(f'ckpts/{VIAR_MODEL}') == str(REPO / 'ckpts' / VIAR_MODEL)
    assert download.resolve_default('ckpts/mine.pth') == 'ckpts/mine.pth'          # not a published name
    assert parse_args([]).vae_ckpt == str(REPO / 'ckpts' / VAR_TOKENIZER)
    (tmp_path / 'ckpts').mkdir()
    assert download.resolve_default(f'ckpts/{VIAR_MODEL}') == f'ckpts/{VIAR_MODEL}'      # the cwd's own ckpts/
    monkeypatch.chdir(REPO)
    assert download.resolve_default(f'ckpts/{VIAR_MODEL}') == f'ckpts/{VIAR_MODEL}'


@pytest.mark.parametrize('script', ['edit', 'bench', 'sweep', 'fixed_point'])
def test_scripts_run_as_files_from_anywhere(script, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'scripts' / f'{script}.py'), '--help'], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.startswith('usage:'), r.stderr[-2000:]


def test_edit_names_itself_the_same_way_everywhere(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'scripts' / 'edit.py'), '--input_img', 'x.png'], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'scripts/edit.py: error:' in r.stderr and 'usage: scripts/edit.py' in r.stderr


@pytest.mark.parametrize('script', ['train.sh', 'eval.sh', 'demo.sh'])
def test_shell_scripts_print_a_usage(script, tmp_path):
    env = {**ENV, 'PYTHON': sys.executable}
    r = subprocess.run(['bash', str(REPO / 'scripts' / script), '--help'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'error' not in r.stderr.lower() and f'bash scripts/{script}' in r.stdout, r.stderr


def test_demo_pn_is_checked_against_the_data_it_would_reuse(tmp_path):
    (tmp_path / 'o' / 'data').mkdir(parents=True)
    (tmp_path / 'o' / 'data' / '.complete').write_text(json.dumps({'reso': 32}))
    r = subprocess.run([sys.executable, str(REPO / 'demo.py'), '--pn', '1_2_4_9', '--out', str(tmp_path / 'o')],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and 'gives 36 px images' in lines[0] and 'end --pn with 8' in lines[0]
    assert sorted(os.listdir(tmp_path / 'o')) == ['data']


def test_npz_disk_full_does_not_leave_a_zip(tmp_path):
    """(guard) a complete npz is still a valid zip after the atomic-write changes."""
    folder = tmp_path / 's'
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / '000000.png')
    npz = misc.create_npz_from_sample_folder(str(folder))
    assert zipfile.is_zipfile(npz)
