"""Tests of evaluator.py: parity with the ADM ("OpenAI") evaluator on the golden batches, the metrics against
independent numpy/scipy computations, the streaming reader, the statistics cache and every bad-input message.

Only the golden run and the non-finite-features case need TensorFlow; the rest runs on numpy/scipy in seconds.
"""
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.special
from scipy.spatial.distance import cdist
from script_main import run_main

import evaluator
from tests.golden import vectors
from utils.zoo import VIAR_MODEL

REPO = Path(__file__).resolve().parents[1]
LINES = ('Inception Score', 'FID', 'sFID', 'Precision', 'Recall')


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / 'evaluator.py'), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900, check=False)


def cli_args(ref, sample, **kw):
    """The command line of ``evaluator.py ref sample --key value ...``."""
    return [str(ref), str(sample), *(str(x) for k, v in kw.items() for x in (f'--{k}', v))]


def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with the ADM evaluator (golden batches, stand-in Inception graph)
# ----------------------------------------------------------------------------------------------------------------------

def test_golden_batches_match_adm_evaluator(golden_src, tmp_path):
    if importlib.util.find_spec('tensorflow') is None:      # not imported here: evaluator.py runs in a subprocess
        pytest.skip('TensorFlow is not installed (requirements-eval.txt)')
    gold = golden_src / 'evaluator'
    expected = vectors.evaluator_expected(golden_src)
    out = tmp_path / 'metrics.json'
    ref = tmp_path / 'ref_batch.npz'                     # a writable copy, for --save_ref_stats
    ref.write_bytes((gold / 'ref_batch.npz').read_bytes())
    with np.load(ref) as z:
        n_ref = z['arr_0'].shape[0]
    proc = run_cli(ref, gold / 'sample_batch.npz', '--inception', gold / 'stand_in_inception.pb', '--json', out,
                   '--save_ref_stats')
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(tmp_path / 'ref_batch_stats.npz') as cache:
        assert cache['pool'].shape == (n_ref, 2048) and cache['mu'].shape == cache['pool'].shape[1:]
        assert cache['sigma_s'].shape == cache['mu_s'].shape * 2
        assert str(cache['graph_sha256']) == evaluator.file_sha256(gold / 'stand_in_inception.pb')

    lines = proc.stdout.strip().splitlines()
    assert [line.split(': ')[0] for line in lines] == list(LINES)
    printed = {name: float(value) for name, value in (line.split(': ') for line in lines)}
    written = json.loads(out.read_text())
    assert {k: written[k] for k in LINES} == printed

    # fewer than 5000 samples: one split, so shuffling cannot change the Inception Score
    assert printed['Inception Score'] == pytest.approx(expected['Inception Score'], rel=1e-3)
    assert printed['FID'] == pytest.approx(expected['FID'], rel=1e-3)
    assert printed['sFID'] == pytest.approx(expected['sFID'], rel=1e-3)
    assert printed['Precision'] == pytest.approx(expected['Precision'], abs=0.005)
    assert printed['Recall'] == pytest.approx(expected['Recall'], abs=0.005)


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------------

def frechet_via_sqrtm(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real


def frechet_via_eigh(mu1, s1, mu2, s2):
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: scipy's eigh instead of a general sqrtm."""
    w, v = scipy.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(scipy.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross


@pytest.mark.parametrize('n1,n2,dim', [(500, 400, 16), (30, 40, 64)])   # full rank, then singular covariances
def test_frechet_distance_matches_independent_computations(n1, n2, dim):
    rng = np.random.default_rng(dim)
    a = rng.standard_normal((n1, dim)) @ rng.standard_normal((dim, dim))
    b = rng.standard_normal((n2, dim)) * 1.5 + 0.3
    mu1, s1 = evaluator.feature_statistics(a)
    mu2, s2 = evaluator.feature_statistics(b)
    assert np.allclose(s1, np.cov(a.T)) and np.allclose(mu1, a.mean(0))
    # default (eigendecompositions) against scipy's sqrtm, the ADM route (use_sqrtm) against scipy's eigh
    got = evaluator.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float) and np.isfinite(got)
    assert got == pytest.approx(frechet_via_sqrtm(mu1, s1, mu2, s2), rel=1e-6)
    adm = evaluator.frechet_distance(mu1, s1, mu2, s2, use_sqrtm=True)
    assert adm == pytest.approx(frechet_via_eigh(mu1, s1, mu2, s2), rel=1e-6)
    # with covariance factors (only made for fewer samples than features): the small-matrix route, same number
    f1, f2 = evaluator.covariance_factor(a), evaluator.covariance_factor(b)
    assert (f1 is None) == (n1 >= dim) and (f2 is None) == (n2 >= dim)
    if f1 is not None:
        assert np.allclose(f1.T @ f1, s1) and np.allclose(f2.T @ f2, s2)
        for factors in [(f1, None), (None, f2), (f1, f2)]:
            assert evaluator.frechet_distance(mu1, s1, mu2, s2, factor1=factors[0], factor2=factors[1]) == \
                pytest.approx(frechet_via_sqrtm(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_rejects_non_finite_and_mismatched_statistics():
    s = np.eye(3)
    with pytest.raises(evaluator.EvalError, match='not finite'):
        evaluator.frechet_distance(np.zeros(3), s, np.array([0, np.nan, 0]), s)
    with pytest.raises(evaluator.EvalError, match='different sizes'):
        evaluator.frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))
    with pytest.raises(evaluator.EvalError, match='different sizes'):
        evaluator.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(2))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    d1, d2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    for use_sqrtm in (False, True):
        got = evaluator.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), use_sqrtm=use_sqrtm)
        assert got == pytest.approx(expected, rel=1e-10)
        s = np.cov(rng.standard_normal((50, 8)).T)
        assert evaluator.frechet_distance(mu1, s, mu1, s, use_sqrtm=use_sqrtm) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch, capsys):
    calls = []

    def fake_sqrtm(mat):
        calls.append(mat.copy())
        return np.full_like(mat, np.nan) if len(calls) == 1 else scipy.linalg.sqrtm(mat)

    monkeypatch.setattr(evaluator, '_sqrtm', fake_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    got = evaluator.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, use_sqrtm=True)
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    assert got == pytest.approx(1 + 4 + 9 + 16 - 2 * (np.sqrt(9 + 1e-6 * 10 + 1e-12) + np.sqrt(64 + 1e-6 * 20 + 1e-12)))
    assert 'not finite' in capsys.readouterr().err


def test_frechet_distance_takes_real_part_of_complex_sqrtm(monkeypatch):
    monkeypatch.setattr(evaluator, '_sqrtm', lambda m: scipy.linalg.sqrtm(m).astype(complex) + 1e-9j)
    s = np.diag([1.0, 2.0])
    assert evaluator.frechet_distance(np.zeros(2), s, np.ones(2), s, use_sqrtm=True) == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------------

def independent_is(probs, split):
    scores = []
    for i in range(0, len(probs), split):
        p = probs[i:i + split].astype(np.float64)
        scores.append(np.exp(np.mean(scipy.special.rel_entr(p, p.mean(0, keepdims=True)).sum(1))))
    return np.mean(scores)


def softmax_rows(n, classes, seed):
    logits = np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32) * 3
    return scipy.special.softmax(logits, axis=1).astype(np.float32)


def test_inception_score_matches_independent_computation():
    probs = softmax_rows(3000, 50, 0)
    got = evaluator.inception_score(probs)
    assert got == pytest.approx(independent_is(probs, 5000), rel=1e-5)
    # one split: shuffling is skipped, so the number is the unshuffled (ADM) one bit for bit
    assert got == evaluator.inception_score(probs, shuffle_seed=None)
    assert evaluator.inception_score(probs, split_size=1000, shuffle_seed=None) == pytest.approx(
        independent_is(probs, 1000), rel=1e-5)


def test_inception_score_shuffles_class_ordered_samples_with_a_fixed_seed():
    classes, per_class = 20, 600   # 12000 samples written class by class: 3 splits of 5000 (the last of 2000)
    labels = np.repeat(np.arange(classes), per_class)
    probs = np.full((len(labels), classes), 0.01 / (classes - 1), np.float32)
    probs[np.arange(len(labels)), labels] = 0.99
    in_order = evaluator.inception_score(probs, shuffle_seed=None)
    # float32 throughout, as in the ADM suite: the column means of 5000 equal rows drift by ~1e-4
    assert in_order == pytest.approx(independent_is(probs, 5000), rel=1e-3)
    shuffled = evaluator.inception_score(probs)
    assert shuffled == evaluator.inception_score(probs)                    # fixed seed: reproducible
    perm = np.random.default_rng(evaluator.IS_SHUFFLE_SEED).permutation(len(probs))
    assert shuffled == pytest.approx(independent_is(probs[perm], 5000), rel=1e-3)
    # each in-order split sees ~9 classes; shuffled splits see all 20, like the whole set
    assert in_order < 0.6 * shuffled
    assert shuffled == pytest.approx(independent_is(probs, len(probs)), rel=0.02)


# ----------------------------------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------------------------------

def independent_pr(ref, sample, k=3):
    """Kynkäänniemi et al. with squared Euclidean distances in float64 (scipy cdist)."""
    r_radii = np.sort(cdist(ref, ref, 'sqeuclidean'), axis=1)[:, k]
    s_radii = np.sort(cdist(sample, sample, 'sqeuclidean'), axis=1)[:, k]
    d = cdist(ref, sample, 'sqeuclidean')
    return (d <= r_radii[:, None]).any(0).mean(), (d <= s_radii[None, :]).any(1).mean()


def integer_features(n, dim, shift, seed):
    """Small integer features: every float16 operation on them is exact, so float16 equals float64."""
    return (np.random.default_rng(seed).integers(0, 4, (n, dim)) + shift).astype(np.float32)


def test_pairwise_distances_are_exact_on_integer_features_and_fall_back_to_float32():
    u, v = integer_features(40, 12, 0, 0), integer_features(30, 12, 1, 1)
    d = evaluator.pairwise_sq_distances(u, v)
    assert d.dtype == np.float32 and np.array_equal(d, cdist(u, v, 'sqeuclidean'))
    # norms beyond float16's range (65504): the float32 formula is used instead
    big_u, big_v = u * 300, v * 300
    d = evaluator.pairwise_sq_distances(big_u, big_v)
    assert np.isfinite(d).all() and np.allclose(d, cdist(big_u, big_v, 'sqeuclidean'), rtol=1e-5)


def test_manifold_radii_are_the_kth_neighbour_counting_the_point_itself():
    x = integer_features(50, 6, 0, 2)
    expected = np.sort(cdist(x, x, 'sqeuclidean'), axis=1)[:, 3]
    assert np.array_equal(evaluator.manifold_radii(x), expected)
    assert np.array_equal(evaluator.manifold_radii(x, batch_size=7), expected)   # block-wise walk


@pytest.mark.parametrize('batch_size', [10000, 13])
def test_precision_recall_match_independent_computation(batch_size):
    ref = integer_features(120, 8, 0, 3)
    sample = integer_features(90, 8, 0, 4) + np.float32(0.5) * (np.arange(90) % 2)[:, None]   # half of them off
    prec, rec = evaluator.precision_recall(ref, sample, batch_size=batch_size)
    exp_prec, exp_rec = independent_pr(ref, sample)
    assert (prec, rec) == (pytest.approx(exp_prec, abs=1e-12), pytest.approx(exp_rec, abs=1e-12))
    assert 0 < prec < 1 and 0 < rec <= 1


def test_precision_recall_on_disjoint_and_identical_sets():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((60, 4)).astype(np.float32)
    assert evaluator.precision_recall(ref, ref + 100) == (0.0, 0.0)
    assert evaluator.precision_recall(ref, ref.copy()) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming reader and statistics files
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('savez', [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, savez):
    arr = images(23, size=5)
    path = tmp_path / 'batch.npz'
    savez(path, arr_0=arr, other=np.zeros(3))
    imgs = evaluator.NpzImages(path)
    assert len(imgs) == 23 and imgs.shape == (23, 5, 5, 3)
    batches = list(imgs.batches(10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert np.array_equal(np.concatenate(batches), arr)


class FakeModel:
    """Stands in for InceptionFeatures: deterministic 'features' of the images, counting the images it sees."""

    def __init__(self):
        self.seen = 0

    def activations(self, imgs, batch_size, desc):
        pools, spatials = [], []
        for batch in imgs.batches(batch_size):
            x = batch.astype(np.float32) / 255
            pools.append(x.mean(axis=(1, 2)))
            spatials.append(x[:, :2, :2, :].reshape(len(x), -1))
            self.seen += len(batch)
        return np.concatenate(pools), np.concatenate(spatials)


def test_reference_statistics_are_saved_and_reused(tmp_path, capsys):
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, arr_0=images(40))
    model = FakeModel()
    ref = evaluator.BatchFile(ref_path, 'reference batch').cached('sha-1')
    pool, stats, factors = ref.read(model, 16, 'sha-1')
    assert model.seen == 40 and ref.images is not None
    assert np.allclose(stats['mu'], pool.mean(0)) and np.allclose(stats['sigma'], np.cov(pool.T))
    # 40 images, 3 pool features: no factor; 12 spatial features: none either (factors only for N < D)
    assert factors == {'sigma': None, 'sigma_s': None}
    cache = evaluator.stats_cache_path(ref_path)
    assert cache == tmp_path / 'ref_stats.npz'
    evaluator.save_stats(cache, pool, stats, ref_path, 'sha-1')

    again = evaluator.BatchFile(ref_path, 'reference batch').cached('sha-1')
    pool2, stats2, _ = again.read(model, 16, 'sha-1')
    assert model.seen == 40 and again.path == cache                      # nothing recomputed
    assert np.array_equal(pool2, pool) and all(np.array_equal(stats[k], stats2[k]) for k in evaluator.STAT_KEYS)
    assert 'using the cached statistics' in capsys.readouterr().err

    other_graph = evaluator.BatchFile(ref_path, 'reference batch').cached('sha-2')
    assert other_graph.path == ref_path and 'ignoring' in capsys.readouterr().err
    # the reference regenerated with other images of the same shape: same file size, other CRC -> recomputed
    size = ref_path.stat().st_size
    np.savez(ref_path, arr_0=images(40, seed=1))
    assert ref_path.stat().st_size == size
    regenerated = evaluator.BatchFile(ref_path, 'reference batch').cached('sha-1')
    assert regenerated.path == ref_path and 'ignoring' in capsys.readouterr().err
    # the cache is a complete reference file by itself: no arr_0 needed
    direct = evaluator.BatchFile(cache, 'reference batch')
    assert direct.images is None and np.array_equal(direct.read(model, 16, 'sha-1')[0], pool)


def test_unwritable_statistics_cache_is_a_warning(tmp_path, capsys):
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, arr_0=images(10))
    stats = dict(zip(evaluator.STAT_KEYS, (np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))))
    assert not evaluator.save_stats(tmp_path / 'missing_dir' / 'ref_stats.npz', np.zeros((10, 3)), stats, ref_path, 's')
    assert 'warning: cannot save the reference statistics' in capsys.readouterr().err


def test_covariance_factors_come_with_computed_statistics_of_few_images(tmp_path):
    path = tmp_path / 'few.npz'
    np.savez(path, arr_0=images(6))
    _, stats, factors = evaluator.BatchFile(path, 'sample batch').read(FakeModel(), 4, 'sha')
    assert factors['sigma'] is None                                   # 6 images, 3 features
    assert factors['sigma_s'].shape == (6, 12)                        # 6 images, 12 features
    assert np.allclose(factors['sigma_s'].T @ factors['sigma_s'], stats['sigma_s'])


def test_stored_statistics_are_used_and_pool_computed_from_arr_0(tmp_path):
    path = tmp_path / 'openai_style_ref.npz'
    stored = {'mu': np.arange(3.0), 'sigma': np.eye(3), 'mu_s': np.ones(12), 'sigma_s': np.eye(12)}
    np.savez(path, arr_0=images(10), **stored)
    model = FakeModel()
    pool, stats, factors = evaluator.BatchFile(path, 'reference batch').read(model, 4, 'sha')
    assert model.seen == 10 and pool.shape == (10, 3)
    assert all(np.array_equal(stats[k], stored[k]) for k in stored)
    assert factors == {'sigma': None, 'sigma_s': None}        # stored statistics: no factor of other activations


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback, non-zero exit
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def good_npz(tmp_path):
    path = tmp_path / 'good.npz'
    np.savez(path, arr_0=images(8))
    return path


def _bad_inputs(tmp_path):
    cases = {}
    (tmp_path / 'text.npz').write_text('not a zip archive\n')
    cases['not_npz'] = (tmp_path / 'text.npz', 'is not an .npz archive')
    np.savez(tmp_path / 'no_arr0.npz', images=images(8))
    cases['no_arr_0'] = (tmp_path / 'no_arr0.npz', 'no arr_0 array in this .npz (it holds: images)')
    np.savez(tmp_path / 'float.npz', arr_0=images(8).astype(np.float32))
    cases['float'] = (tmp_path / 'float.npz', 'must hold uint8 images of shape (N, H, W, 3); it holds float32')
    np.savez(tmp_path / 'gray.npz', arr_0=images(8)[..., :1])
    cases['one_channel'] = (tmp_path / 'gray.npz', 'it holds uint8 of shape (8, 8, 8, 1)')
    np.savez(tmp_path / 'nchw.npz', arr_0=images(8).transpose(0, 3, 1, 2))
    cases['nchw'] = (tmp_path / 'nchw.npz', 'it holds uint8 of shape (8, 3, 8, 8)')
    np.savez(tmp_path / 'flat.npz', arr_0=images(8).reshape(8, -1))
    cases['three_dims'] = (tmp_path / 'flat.npz', 'it holds uint8 of shape (8, 192)')
    np.savez(tmp_path / 'few.npz', arr_0=images(3))
    cases['too_few'] = (tmp_path / 'few.npz', 'holds 3 images; precision/recall need at least 4')
    cases['missing'] = (tmp_path / 'nowhere.npz', 'nowhere.npz not found')
    (tmp_path / 'samples').mkdir()
    cases['directory'] = (tmp_path / 'samples', 'samples is a directory, not an .npz file: pass an .npz archive')
    return cases


@pytest.mark.parametrize('case', ['missing', 'directory', 'not_npz', 'no_arr_0', 'float', 'one_channel', 'nchw',
                                  'three_dims', 'too_few'])
@pytest.mark.parametrize('which', ['reference', 'sample'])
def test_bad_input_is_one_clear_line(tmp_path, good_npz, case, which):
    bad, message = _bad_inputs(tmp_path)[case]
    files = (bad, good_npz) if which == 'reference' else (good_npz, bad)
    # checked before the Inception graph is looked for: a missing graph must not mask the input error
    proc = run_cli(*files, '--inception', tmp_path / 'absent.pb')
    assert proc.returncode == 1 and proc.stdout == ''
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert err.startswith(f'evaluator.py: error: {which} batch') and message in err, err


def test_a_sample_folder_instead_of_its_npz_is_named(tmp_path, good_npz):
    """D8: the folder sampling.py wrote, passed instead of the .npz packed next to it."""
    folder = tmp_path / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1'
    folder.mkdir()
    with pytest.raises(evaluator.EvalError, match='is a directory, not an .npz file') as e:
        evaluator.BatchFile(folder, 'sample batch')
    assert 'is one' not in str(e.value)
    (tmp_path / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1.npz').write_bytes(good_npz.read_bytes())
    with pytest.raises(evaluator.EvalError, match=re.escape(f'({folder}.npz is one)')):
        evaluator.BatchFile(folder, 'sample batch')
    with pytest.raises(evaluator.EvalError, match='is a directory: pass the classify_image_graph_def.pb file'):
        evaluator.resolve_inception(str(tmp_path))


def test_missing_inception_graph(tmp_path, good_npz):
    proc = run_cli(good_npz, good_npz, '--inception', tmp_path / 'absent.pb')
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f'evaluator.py: error: Inception graph {tmp_path / "absent.pb"} not found '
                                   f'(omit --inception to use or download {evaluator.INCEPTION_URL})')


def test_offline_download_fails_with_url_and_destination(tmp_path, good_npz, monkeypatch, capsys):
    pytest.importorskip('tensorflow')       # without it, the line says what to install before any download
    url = 'http://127.0.0.1:9/classify_image_graph_def.pb'   # nothing listens on the discard port
    monkeypatch.setattr(evaluator, 'INCEPTION_URL', url)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    with pytest.raises(SystemExit) as exc:
        run_main(evaluator.main, cli_args(good_npz, good_npz))
    dest = tmp_path / 'cache' / 'viar' / 'classify_image_graph_def.pb'
    captured = capsys.readouterr()
    note, message = captured.err.strip().splitlines()
    assert exc.value.code == 1 and note == f'Inception graph not in the cache; downloading it to {dest}'
    assert message.startswith(f'evaluator.py: error: cannot download the Inception graph from {url} (')
    assert f'save it as {dest}, or pass --inception PATH' in message
    assert not dest.exists() and not dest.with_name(dest.name + '.part').exists()
    assert captured.out == ''


def test_cached_inception_graph_is_used_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    graph = tmp_path / 'viar' / 'classify_image_graph_def.pb'
    graph.parent.mkdir()
    graph.write_bytes(b'graph')
    monkeypatch.setattr(evaluator, 'download', lambda *a: pytest.fail('downloaded although cached'))
    assert evaluator.resolve_inception() == graph
    assert evaluator.resolve_inception(str(graph)) == graph


def write_nan_graph(path):
    """A graph with the Inception tensor names whose features are NaN."""
    tf = pytest.importorskip('tensorflow')
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, None, None, 3], name='ExpandDims')
        conv = tf.math.log(x - 1000.0, name='mixed_6/conv')                       # log of a negative: NaN
        pool = tf.reduce_mean(conv, axis=[1, 2], keepdims=True, name='pool_3')
        flat = tf.reshape(pool, [-1, 3])
        tf.matmul(flat, tf.constant(np.ones((3, 5), np.float32)), name='softmax/logits/MatMul')
    path.write_bytes(graph.as_graph_def().SerializeToString())


def test_non_finite_features(tmp_path, good_npz, capsys):
    write_nan_graph(tmp_path / 'nan.pb')
    with pytest.raises(SystemExit) as exc:
        run_main(evaluator.main, cli_args(good_npz, good_npz, inception=str(tmp_path / 'nan.pb')))
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()[-1]        # after the progress bar
    assert exc.value.code == 1
    assert message == (f'evaluator.py: error: reference batch {good_npz}: the Inception features are not finite '
                       f'(NaN or Inf); check the images and the Inception graph')
    assert captured.out == ''


def test_stored_non_finite_pool_and_bad_batch_size(tmp_path, good_npz, monkeypatch, capsys):
    stats = {'mu': np.zeros(3), 'sigma': np.eye(3), 'mu_s': np.zeros(3), 'sigma_s': np.eye(3)}
    path = tmp_path / 'stats.npz'
    np.savez(path, pool=np.full((10, 3), np.nan, np.float32), **stats)
    with pytest.raises(evaluator.EvalError, match='features are not finite'):
        evaluator.BatchFile(path, 'sample batch').read(FakeModel(), 8, 'sha')
    with pytest.raises(SystemExit) as exc:
        run_main(evaluator.main, cli_args(good_npz, good_npz, batch_size=0))
    assert exc.value.code == 1
    assert capsys.readouterr().err == 'evaluator.py: error: --batch_size must be positive, got 0\n'


def test_errors_are_user_errors_and_the_session_grows_gpu_memory(tmp_path, monkeypatch):
    """H6: the TensorFlow session gets the ADM suite's options (GPU memory as needed, soft placement)."""
    from utils.errors import UserError
    assert issubclass(evaluator.EvalError, UserError)
    tf = pytest.importorskip('tensorflow')
    config = evaluator.session_config(tf.compat.v1)
    assert config.gpu_options.allow_growth is True and config.allow_soft_placement is True
    made = []
    real = tf.compat.v1.Session

    def recording_session(*args, **kwargs):
        made.append(kwargs.get('config'))
        return real(*args, **kwargs)
    monkeypatch.setattr(tf.compat.v1, 'Session', recording_session)
    write_nan_graph(tmp_path / 'graph.pb')
    evaluator.InceptionFeatures(tmp_path / 'graph.pb')
    assert len(made) == 1 and made[0].gpu_options.allow_growth and made[0].allow_soft_placement


def test_damaged_zip_member_is_reported(tmp_path):
    path = tmp_path / 'damaged.npz'
    np.savez_compressed(path, arr_0=images(50, size=16))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo('arr_0.npy')
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    imgs = evaluator.NpzImages(path)          # the header is intact
    with pytest.raises(evaluator.EvalError, match='damaged|truncated'):
        for _ in imgs.batches(8):
            pass
