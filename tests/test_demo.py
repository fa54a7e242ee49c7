"""The laptop demo: procedural data, the scoring classifier, and the end-to-end pipeline (tokenizer -> VIAR ->
gen_img.py -> classifier) whose class-conditional samples must show the class they were asked for."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from utils import demo_data


def test_demo_dataset_is_deterministic_resumable_and_checked(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    names = demo_data.make_demo_dataset(a, num_train=3, num_val=2, num_classes=3, verbose=False)
    assert names == list(demo_data.CLASSES)[:3]
    files = sorted(p.relative_to(a) for p in a.rglob('*.png'))
    assert len(files) == 3 * (3 + 2)
    # an interrupted run (a missing file) is completed by a rerun, and the same call draws the same bytes
    demo_data.make_demo_dataset(b, num_train=3, num_val=2, num_classes=3, verbose=False)
    os.remove(b / 'train' / names[1] / '00002.png')
    (b / '.complete').unlink()
    demo_data.make_demo_dataset(b, num_train=3, num_val=2, num_classes=3, verbose=False)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # the images are what render_batch returns, and train and val differ
    x, y = demo_data.render_batch(2, num_classes=3, split='val')
    x2, y2, folder_names = demo_data.load_folder(a / 'val')
    order = [names.index(n) for n in folder_names]
    assert torch.equal(y2, torch.tensor([c for c in range(3) for _ in range(2)]))
    for i, c in enumerate(order):
        assert torch.allclose(x2[2 * i:2 * i + 2], x[2 * c:2 * c + 2], atol=1e-6)
    assert not torch.equal(demo_data.render_batch(1, 1, 'train')[0], demo_data.render_batch(1, 1, 'val')[0])
    with pytest.raises(demo_data.DemoDataError, match='other parameters'):
        demo_data.make_demo_dataset(a, num_train=4, num_val=2, num_classes=3, verbose=False)
    with pytest.raises(demo_data.DemoDataError, match='classes'):
        demo_data.class_names(99)


def test_classifier_recognises_the_classes_at_32_px():
    x, y = demo_data.render_batch(24, num_classes=4, split='train')
    xv, yv = demo_data.render_batch(8, num_classes=4, split='val')
    x, xv = F.interpolate(x, size=32, mode='area'), F.interpolate(xv, size=32, mode='area')
    torch.manual_seed(0)
    clf = demo_data.train_classifier(x, y, 4, steps=60, bs=32)
    acc = (demo_data.classify(clf, xv) == yv).float().mean().item()
    assert acc >= 0.9, acc


DEMO_CMD = ['demo.py', '--classes', '4', '--num_train', '50', '--num_val', '8', '--vae_ep', '16', '--var_ep', '12',
            '--var_bs', '16', '--per_class', '8', '--clf_steps', '60', '--iters_a', '4-4', '--iters_b', '1-2',
            '--threads', '2']


@pytest.fixture(scope='module')
def demo_run(repo_dir, tmp_path_factory):
    """One small demo.py run (4 classes, ~200 tokenizer and ~150 VIAR steps), shared by the tests below."""
    out = tmp_path_factory.mktemp('demo')
    cmd = [sys.executable, *DEMO_CMD, '--out', str(out)]
    r = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, cmd


@pytest.mark.slow
def test_tokenizer_learns_on_the_demo_data(demo_run):
    """train_vae.py (as the demo runs it): validation reconstruction error falls and beats the mean image by a clear
    margin (a collapsed tokenizer that outputs the mean image also "falls"), and the codebook is used."""
    out, _ = demo_run
    vae_dir = out / 'vae'
    epochs = [json.loads(line) for line in (vae_dir / 'log.txt').read_text().splitlines() if '"val_MSE"' in line]
    assert len(epochs) >= 2
    mse = [e['val_MSE'] for e in epochs]
    assert mse[-1] < mse[0], mse
    x, _, _ = demo_data.load_folder(out / 'data' / 'val')
    x = F.interpolate(x, size=16, mode='area')
    mean_image_mse = (x - x.mean(0, keepdim=True)).square().mean().item()
    assert mse[-1] < 0.8 * mean_image_mse, (mse, mean_image_mse)
    assert epochs[-1]['val_code_used_pct'][-1] >= 10, epochs[-1]       # the finest scale: not a collapsed codebook
    assert len(epochs[-1]['usage_pct']) == 4
    assert any(n.startswith('tb-VAE') for n in os.listdir(vae_dir)) and list((vae_dir / 'recon').glob('ep*.png'))
    # 8 GroupNorm groups cannot be read from a state dict: the export carries them, and the loader builds them
    from models.checkpoint import load_vae
    vae = load_vae(str(vae_dir / 'vae_ch32v256z16.pth'), 'cpu', patch_nums=(1, 2, 3, 4))
    assert vae.arch == dict(ch_mult=(1, 2, 4), num_res_blocks=1, using_sa=False, using_mid_sa=False, norm_groups=8)
    assert vae.encoder.norm_out.num_groups == 8 and vae.downsample == 4


@pytest.mark.slow
def test_demo_samples_show_the_requested_class(demo_run, repo_dir):
    """The class-conditional VIAR of the demo: the classifier finds the requested class in the samples clearly more
    often than chance (25 %); the grids exist; a rerun skips every finished step."""
    out, cmd = demo_run
    rep = json.loads((out / 'report.json').read_text())
    for sched in ('4-4', '1-2'):
        assert os.path.isfile(rep['grids'][sched])
    assert rep['real_val_accuracy'] >= 0.9
    best = max(rep['sample_accuracy'].values())
    assert best >= 2 * rep['chance'], rep
    r2 = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert r2.returncode == 0 and 'nothing to do' in r2.stdout and 'exist' in r2.stdout, r2.stdout[-2000:]
