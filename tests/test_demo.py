"""The laptop demo: procedural data, the scoring classifier, bad flags, and a small end-to-end run (tokenizer -> VIAR ->
gen_img.py -> classifier) whose class-conditional samples must show the class they were asked for.

Hardware: training runs diverge between CPU kernels (``ATEN_CPU_CAPABILITY`` default / avx2 / avx512 round matmuls
differently, and the differences grow over hundreds of steps), so the end-to-end checks compare the run with its own
baselines (the mean image, the first validation, the next class) wherever they can, and the few absolute thresholds
left have the margins measured on six kernel/thread settings (see ``MARGINS``)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from models.demo_classifier import classify, train_classifier
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
    assert folder_names == sorted(names) and x2.shape[-1] == demo_data.RESO
    order = [names.index(n) for n in folder_names]
    assert torch.equal(y2, torch.tensor([c for c in range(3) for _ in range(2)]))
    for i, c in enumerate(order):
        assert torch.allclose(x2[2 * i:2 * i + 2], x[2 * c:2 * c + 2], atol=1e-6)
    assert not torch.equal(demo_data.render_batch(1, 1, 'train')[0], demo_data.render_batch(1, 1, 'val')[0])
    with pytest.raises(demo_data.DemoDataError, match='other parameters'):
        demo_data.make_demo_dataset(a, num_train=4, num_val=2, num_classes=3, verbose=False)
    with pytest.raises(demo_data.DemoDataError, match='classes'):
        demo_data.class_names(99)


def test_classifier_tells_the_classes_apart():
    """All eight classes at 32 px, after 100 steps: real validation images right, and labels shuffled across
    classes are not learnt (the classifier sees the pictures, not the order of the data)."""
    x, y = demo_data.render_batch(16, split='train')
    xv, yv = demo_data.render_batch(8, split='val')
    clf = train_classifier(x, y, 8, steps=100, bs=32)
    acc = (classify(clf, xv) == yv).float().mean().item()
    assert acc >= 0.9, acc        # MARGINS['classifier']
    y_shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    clf = train_classifier(x, y_shuffled, 8, steps=100, bs=32)
    assert (classify(clf, xv) == yv).float().mean().item() < acc - 0.5


@pytest.mark.parametrize('flags, says', [
    (['--classes', '9'], '--classes must be 2 to 8'),
    (['--classes', '0'], '--classes must be 2 to 8'),
    (['--iters', '10-x'], "--iters '10-x'"),
    (['--iters', '0-4'], 'iteration counts must be >= 1'),
    (['--pn', '1_3_2'], '--pn'),
    (['--vae_ch', '30'], '--vae_norm_groups'),
    (['--classes', 'two'], '--classes'),
    (['--iter_tol', '-1'], '--iter_tol must be >= 0'),
])
def test_bad_flags_stop_with_one_line(repo_dir, tmp_path, flags, says):
    out = tmp_path / 'never'
    r = subprocess.run([sys.executable, 'demo.py', *flags, '--out', str(out)], cwd=repo_dir, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('demo.py: error: ') and says in lines[0], r.stderr
    assert not out.exists()         # checked before anything is written


# A small demo: 4 classes at 16 px (scales 1_2_3_4 on the 4x tokenizer), 640 tokenizer and 256 VIAR steps.
DEMO_FLAGS = ['--classes', '4', '--num_train', '64', '--num_val', '12', '--pn', '1_2_3_4', '--vocab_size', '64',
              '--vae_ep', '20', '--vae_bs', '8', '--vae_warmup', '2', '--var_ep', '16', '--var_bs', '16',
              '--depth', '1', '--tblr', '3e-2', '--per_class', '8', '--clf_steps', '100', '--speed_batch', '8',
              '--iters', '10-10', '1-1']

# The thresholds' margins: the worst value over six runs of this file (ATEN_CPU_CAPABILITY default, avx2 and the
# native avx512 of an AMD EPYC Zen 5, each with OMP_NUM_THREADS 1 and 2; torch 2.14.1) against the threshold.  The
# runs differ by thread count and kernel (default vs avx2/avx512), so they cover the spread a user's machine adds.
MARGINS = {
    'classifier': 'real validation accuracy 1.0 in all six >= 0.9; shuffled labels 0.03-0.08 (< acc - 0.5)',
    'tokenizer_vs_first_val': 'last / first validation MSE: worst 0.50 (default, 1 thread) < 0.7',
    'tokenizer_vs_mean_image': 'last validation MSE / the mean image\'s: worst 0.21 (default, 1 thread) < 0.3',
    'recon_vs_real': 'real - recon accuracy: worst 0.083 (default, 1 thread) <= 0.25',
    'codes_used': 'last scale\'s codes used: worst 20 % (avx2/avx512, 2 threads) >= 10 %',
    'requested_vs_next': 'requested - next class at 10->10: worst 0.75 (avx2/avx512, 1 thread) >= 0.4',
    'vs_chance': 'requested class at 10->10: worst 0.81 (avx2/avx512, 1 thread) >= 0.5 (2 x chance)',
    'residuals': 'largest last residual at 10->10 3.2e-4, smallest at 1->1 1.27 (must be smaller)',
    'anderson_decades': 'Anderson - Picard mean log10 residual, iterations 6-12: worst -0.20 (the six settings on one '
                        'trained model) < -0.05',
}


@pytest.fixture(scope='module')
def demo_run(repo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    cmd = [sys.executable, 'demo.py', *DEMO_FLAGS, '--out', str(out)]
    r = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, cmd, r.stdout, json.loads((out / 'report.json').read_text())


@pytest.mark.slow
def test_tokenizer_learns_on_the_demo_data(demo_run):
    """train_vae.py as the demo runs it: the validation error ends well below the first validation and below 0.3 of
    the mean image's (a tokenizer that collapsed to the mean image would sit at 1.0; this one ends at 0.09-0.21), its
    reconstructions are recognised about as often as the real images, and the codebook is used."""
    out, _, _, rep = demo_run
    tok, sc = rep['tokenizer'], rep['score']
    mse = tok['val_mse']
    assert len(mse) >= 3 and mse[-1] < 0.7 * mse[0], mse                       # MARGINS['tokenizer_vs_first_val']
    x, _, _ = demo_data.load_folder(out / 'data' / 'val')
    mean_image_mse = (x - x.mean(0, keepdim=True)).square().mean().item()
    assert mse[-1] < 0.3 * mean_image_mse, (mse, mean_image_mse)               # MARGINS['tokenizer_vs_mean_image']
    assert sc['recon_val_accuracy'] >= sc['real_val_accuracy'] - 0.25, sc      # MARGINS['recon_vs_real']
    assert tok['codes_used_pct_per_scale'][-1] >= 10, tok                      # MARGINS['codes_used']
    # 8 GroupNorm groups cannot be read from a state dict: the export carries them, and the loader builds them
    from models.checkpoint import load_vae
    vae = load_vae(tok['checkpoint'], 'cpu', patch_nums=(1, 2, 3, 4))
    assert vae.arch == dict(ch_mult=(1, 2, 4), num_res_blocks=1, using_sa=False, using_mid_sa=False, norm_groups=8)
    assert vae.encoder.norm_out.num_groups == 8 and vae.downsample == 4 and vae.vocab_size == 64


@pytest.mark.slow
def test_demo_samples_show_the_requested_class(demo_run):
    """The class-conditional VIAR: at the paper's schedule the classifier finds the requested class far more often
    than the next class (what a generator that ignores its label would score, on average, in both), and more
    iterations do not make it worse than one.  The grids, the side-by-side picture and the speed table exist."""
    out, _, stdout, rep = demo_run
    sc, sp = rep['score'], rep['speed']
    assert rep['reference_schedule'] == '10-10' and set(sc['sample_accuracy']) == {'10-10', '1-1', '10-10-tol0.05'}
    acc, nxt = sc['sample_accuracy']['10-10'], sc['sample_accuracy_next_class']['10-10']
    assert acc >= nxt + 0.4, sc                  # MARGINS['requested_vs_next']
    assert acc >= 2 * sc['chance'], sc           # MARGINS['vs_chance']
    assert set(sc['sample_accuracy_per_class']['10-10']) == set(rep['data']['classes'])
    for key in ('10-10', '1-1', '10-10-tol0.05'):
        assert os.path.isfile(rep['samples']['grids'][key])
        assert sp['images_per_s'][key] > 0
    assert sp['iterations_per_scale']['10-10'] == [10] * 4 and sp['iterations_per_scale']['1-1'] == [1] * 4
    # the fixed point: after ten iterations the last step moves z less than the first one did
    assert max(sp['last_residual_per_scale']['10-10']) < min(sp['last_residual_per_scale']['1-1']), sp
    # the adaptive schedule: at most the first schedule's iterations, and a scale stops early only below the tolerance
    # (every row's residual <= tol implies the whole batch's <= tol)
    for n, res in zip(sp['iterations_per_scale']['10-10-tol0.05'], sp['last_residual_per_scale']['10-10-tol0.05']):
        assert 1 <= n <= 10 and (n == 10 or res <= 0.05), sp
    from PIL import Image
    with Image.open(rep['grids_side_by_side']) as im:
        assert im.width > 2 * 8 * 16 * 8 and im.height > 4 * 16 * 8
    assert 'images/s' in stdout and 'report.json' in stdout and 'gen_img.py --use_implicit' in stdout
    # editing a red disc: in-painting, out-painting, a class edit to the blue triangle; a grid each: original, masked
    # input, four results (16 px tiles, 2 px padding)
    ed = rep['edit']
    assert ed['input_class'] == 'red_disc' and ed['class_edit_to'] == 'blue_triangle'
    assert set(ed['grids']) == {'inpaint', 'outpaint', 'class_edit'}
    for g in ed['grids'].values():
        with Image.open(g) as im:
            assert im.size == (6 * 18 + 2, 20), g


@pytest.mark.slow
def test_editing_invariants_hold_on_the_trained_demo_model(demo_run):
    """Zero-shot editing with the demo's trained VIAR (tests/test_edit.py checks random weights and the official
    vectors): the kept tokens are the input's at every scale, an all-ones keep-mask gives back the tokenizer's
    reconstruction, and an all-zero mask with the drawn 1x1 token (kept whatever the mask) is plain sampling."""
    import torch.nn.functional as F

    from models import get_edit_mask
    from models.checkpoint import load_vae_var
    out, _, _, rep = demo_run
    vae, var = load_vae_var(rep['tokenizer']['checkpoint'], rep['viar']['checkpoint'])
    x, y, _ = demo_data.load_folder(out / 'data' / 'val', max_per_class=1)
    pn = var.patch_nums
    with torch.no_grad():
        tokens = vae.img_to_idxBl(x, pn)
    kw = dict(B=len(y), label_B=y, g_seed=3, cfg=2.0, top_k=0, top_p=0.0, iter_left=3, iter_right=3, ret_idx_Bl=True)
    keep = get_edit_mask(pn, 0.0, 0.5, 1.0, 1.0, inpainting=True)           # the right half is generated
    _, idx = var.autoregressive_infer_cfg(**kw, input_img_tokens=tokens, edit_mask=keep)
    for si, p in enumerate(pn):
        k = F.interpolate(keep[None, None], size=(p, p), mode='bilinear', align_corners=False)[0, 0].reshape(-1) > 0.5
        if p * p <= 3:
            k[:] = True
        assert torch.equal(idx[si][:, k], tokens[si][:, k]), si
    img, idx = var.autoregressive_infer_cfg(**kw, input_img_tokens=tokens, edit_mask=torch.ones(pn[-1], pn[-1]))
    assert all(torch.equal(a, b) for a, b in zip(idx, tokens))
    with torch.no_grad():
        recon = vae.img_to_reconstructed_img(x, last_one=True).add(1).mul(0.5)
    torch.testing.assert_close(img, recon, rtol=0, atol=1e-5)
    plain, plain_idx = var.autoregressive_infer_cfg(**kw)
    inputs = [plain_idx[0]] + tokens[1:]
    img, idx = var.autoregressive_infer_cfg(**kw, input_img_tokens=inputs, edit_mask=torch.zeros(pn[-1], pn[-1]))
    assert torch.equal(img, plain) and all(torch.equal(a, b) for a, b in zip(idx, plain_idx))


@pytest.mark.slow
def test_rerun_skips_every_finished_stage_and_scores_the_same(demo_run, repo_dir):
    out, cmd, _, rep = demo_run
    r = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count('nothing to do') == 2 and r.stdout.count('exist:') == 3, r.stdout[-3000:]
    assert r.stdout.count('exists:') == 3 and 'scripts.edit' not in r.stdout, r.stdout[-3000:]
    assert 'gen_img.py' not in r.stdout.replace('python gen_img.py --use_implicit', '')
    rep2 = json.loads((out / 'report.json').read_text())
    assert rep2['score'] == rep['score'] and rep2['tokenizer'] == rep['tokenizer'] and rep2['viar'] == rep['viar']
    assert rep2['edit'] == rep['edit']


def residual_rows(var, solver: str, n: int = 30) -> list:
    """Per scale, the relative fixed-point residual of every CFG row (2 images of each class, g_seed 1, cfg 2) at each
    of ``n`` iterations: (n, rows) tensors."""
    trace, labels = {}, torch.arange(var.num_classes).repeat_interleave(2)
    with torch.inference_mode():
        var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=1, cfg=2.0, top_k=0, top_p=0.0,
                                     iter_left=n, iter_right=n, trace=trace, iter_solver=solver)
    return trace['residual_rows']


def mean_iterations_to(rows: list, tol: float = 1e-4) -> list:
    """Per scale, the mean over the rows of the first iteration whose residual is below ``tol`` (n + 1 for a row that
    never gets there)."""
    out = []
    for R in rows:
        below = R < tol
        first = torch.where(below.any(dim=0), below.float().argmax(dim=0) + 1, len(R) + 1)
        out.append(first.double().mean().item())
    return out


@pytest.mark.slow
def test_anderson_converges_in_fewer_iterations_than_picard_on_the_demo_model(demo_run):
    """The fixed point of the trained demo VIAR: Anderson acceleration (memory 5) is closer to the fixed point than
    the paper's plain iteration at every scale, and gets the rows below a relative residual of 1e-4 in fewer
    iterations.  Counts of iterations move in steps of one row, so the per-scale comparison rests on the mean log10
    residual over iterations 6-12 (measured on this test's model: Anderson 0.20-0.51 decades lower at every scale);
    the counts to 1e-4 are compared in total (this model 38.8 Picard against 36.3 Anderson; per scale
    9.4/10.7/9.2/9.5 against 9.0/9.3/9.0/9.1; the full demo's, ``bash scripts/demo.sh``, 12.3/10.6/13.5/19.7 against
    10.1/9.9/10.5/12.0)."""
    from models.checkpoint import load_vae_var
    _, _, _, rep = demo_run
    _, var = load_vae_var(rep['tokenizer']['checkpoint'], rep['viar']['checkpoint'])
    picard, anderson = residual_rows(var, 'picard'), residual_rows(var, 'anderson')
    gap = [(a[5:12].clamp_min(1e-12).log10().mean() - p[5:12].clamp_min(1e-12).log10().mean()).item()
           for p, a in zip(picard, anderson)]
    assert all(g < -0.05 for g in gap), gap                                       # MARGINS['anderson_decades']
    n_picard, n_anderson = mean_iterations_to(picard), mean_iterations_to(anderson)
    assert sum(n_anderson) < sum(n_picard), (n_picard, n_anderson)
