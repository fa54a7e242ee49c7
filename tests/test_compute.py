"""Compute control (issue #13): the fixed-point trace and ``iter_tol`` of ``autoregressive_infer_cfg``, the
diagnostics script ``scripts/fixed_point.py`` and the quality-compute sweep ``scripts/sweep.py``, on tiny random
models.  Every check is an exact equality (bytes, tokens, counts) or a recomputation to float rounding; none is a
threshold on quality or speed."""
import os

import pytest
import torch

from models import build_vae_var
from utils.zoo import VIAR_MODEL

PNS = (1, 2, 3, 4)
NUM_CLASSES = 4


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread (float results on CPU depend on it; several spinning threads are slow on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(implicit: bool, seed: int = 0):
    """(vae, var): 64 px, 4 scales, V=64, width 64 (VIAR: 1 pre + implicit + 1 post block).  The AdaLN gammas and the
    head are initialised larger than for training so that the implicit block moves z (residuals from ~3 down to
    ~1e-5 over 10 iterations) and the iteration count changes the tokens drawn."""
    torch.manual_seed(seed)
    vae, var = build_vae_var(device='cpu', patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=NUM_CLASSES, depth=1,
                             use_implicit=implicit, pre_depth=1, post_depth=1, init_adaln_gamma=0.3, init_head=1.0)
    return vae.eval(), var.eval()


@pytest.fixture(scope='module')
def viar():
    return tiny(True)[1]


@pytest.fixture(scope='module')
def var():
    return tiny(False)[1]


def sample(model, iters=(10, 10), B=2, g_seed=3, dtype=None, **kw):
    """(images, tokens of every scale concatenated) of one sampler call."""
    labels = torch.arange(B) % NUM_CLASSES
    with torch.inference_mode(), torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
        img, idx = model.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=g_seed, cfg=1.5, top_k=0, top_p=0.0,
                                                  iter_left=iters[0], iter_right=iters[1], ret_idx_Bl=True, **kw)
    return img, torch.cat(idx, dim=1)


def assert_same(a, b):
    assert a[0].dtype == b[0].dtype and torch.equal(a[0], b[0]), 'images differ'
    assert torch.equal(a[1], b[1]), 'tokens differ'


def assert_differ(a, b):
    """The comparison is not vacuous: the two settings give other tokens."""
    assert not torch.equal(a[1], b[1])


# ============================================== the model: iter_tol ===================================================
def test_iter_tol_zero_is_the_fixed_schedule(viar):
    trace = {}
    tol0 = sample(viar, (10, 5), iter_tol=0.0, trace=trace)
    assert_same(tol0, sample(viar, (10, 5)))
    assert trace['iters'] == [10, 8, 6, 5]                   # int(linspace(10, 5, 4)): no scale stopped early
    assert_differ(tol0, sample(viar, (1, 1)))


def test_huge_iter_tol_is_one_iteration_per_scale(viar):
    trace = {}
    huge = sample(viar, (10, 5), iter_tol=1e9, trace=trace)
    assert trace['iters'] == [1, 1, 1, 1]
    assert_same(huge, sample(viar, (1, 1)))
    assert_differ(huge, sample(viar, (10, 5)))


def test_early_exit_equals_the_schedule_it_ran(viar, monkeypatch):
    """With a tolerance that stops some scales early, the result is exactly that of the per-scale schedule the trace
    reports (a stop at i iterations is the schedule entry i: later scales see the caches of the iterations run)."""
    trace = {}
    run = sample(viar, (10, 4), iter_tol=1e-3, trace=trace)
    iters = trace['iters']
    assert iters[-1] == 4 and any(n < 10 for n in iters[:3]) and len(set(iters)) > 1, iters
    monkeypatch.setattr(viar.backbone, 'schedule', lambda *a: list(iters))
    assert_same(run, sample(viar, (10, 4)))


@pytest.mark.parametrize('kw', [dict(iter_tol=0.0), dict(iter_tol=1e9), dict(trace={}), dict(iter_tol=1e-3, trace={})])
def test_var_ignores_iter_tol_and_trace(var, kw):
    assert_same(sample(var, **kw), sample(var))
    if 'trace' in kw:
        assert kw['trace'] == {'iters': [], 'iters_per_image': [], 'residual': [], 'residual_rows': []}


def test_negative_iter_tol_is_refused(viar):
    with pytest.raises(ValueError, match='iter_tol must be >= 0'):
        sample(viar, iter_tol=-1.0)


# ============================================== the model: per-image exit, seeds, Anderson, warm start ================
SOLVERS = [dict(), dict(iter_solver='anderson'), dict(iter_solver='anderson', anderson_m=2, anderson_beta=0.7)]


@pytest.mark.parametrize('solver', SOLVERS)
def test_row_exit_tol_zero_is_the_fixed_schedule(viar, solver):
    trace = {}
    run = sample(viar, (10, 5), iter_tol=0.0, iter_exit='row', trace=trace, **solver)
    assert_same(run, sample(viar, (10, 5), **solver))
    assert trace['iters'] == [10, 8, 6, 5] and trace['iters_per_image'] == [[n, n] for n in (10, 8, 6, 5)]


@pytest.mark.parametrize('solver', SOLVERS)
def test_row_exit_huge_tol_is_one_iteration_per_scale(viar, solver):
    trace = {}
    run = sample(viar, (10, 5), iter_tol=1e9, iter_exit='row', trace=trace, **solver)
    assert trace['iters_per_image'] == [[1, 1]] * 4
    assert_same(run, sample(viar, (1, 1), **solver))
    assert_differ(run, sample(viar, (10, 5), **solver))


def test_paper_sampler_by_name_and_one_seed_list_are_todays_bytes(viar):
    """'picard' + 'batch' + no warm start spelled out is the default sampler; ``g_seed=[s]`` for one image draws what
    ``g_seed=s`` draws (a fresh generator with the same seed), with given and with drawn labels."""
    base = sample(viar, (10, 5), B=1, iter_tol=3e-3)
    assert_same(sample(viar, (10, 5), B=1, iter_tol=3e-3, iter_exit='batch', iter_solver='picard', anderson_m=2,
                       warm_start=False), base)
    assert_same(sample(viar, (10, 5), B=1, g_seed=[3], iter_tol=3e-3), base)
    with torch.inference_mode():
        a = viar.autoregressive_infer_cfg(B=1, label_B=None, g_seed=7, iter_left=3, iter_right=3)
        b = viar.autoregressive_infer_cfg(B=1, label_B=None, g_seed=[7], iter_left=3, iter_right=3)
    assert torch.equal(a, b)


# (B=3, labels given or drawn) with per-image seeds against each image alone.  Tokens must be equal; the images may
# differ by the decoder's rounding (a convolution over 3 images vs 1: <= 1e-5 measured, 1/255 = 4e-3 is one level)
# (tolerances at which the images of the labelled batch stop at other iterations of some scale on this model)
BATCH_VS_ALONE = [dict(iter_tol=1e-4, iter_exit='row'), dict(iter_tol=2e-4, iter_exit='row', iter_solver='anderson'),
                  dict(iter_tol=1e-4, iter_exit='row', warm_start=True), dict(more_smooth=True)]


@pytest.mark.parametrize('kw', BATCH_VS_ALONE)
@pytest.mark.parametrize('labels', [[0, 1, 3], None])
def test_an_image_in_a_batch_is_the_image_alone_with_per_image_seeds(viar, kw, labels):
    seeds, trace = [11, 22, 33], {}
    lab = None if labels is None else torch.tensor(labels)

    def run(idx, tr=None):
        with torch.inference_mode():
            return viar.autoregressive_infer_cfg(
                B=len(idx), label_B=None if lab is None else lab[idx], g_seed=[seeds[i] for i in idx], cfg=1.5,
                top_k=0, top_p=0.0, iter_left=10, iter_right=10, ret_idx_Bl=True, trace=tr, **kw)
    img, idx = run([0, 1, 2], trace)
    alone = [run([b]) for b in range(3)]
    for si in range(len(PNS)):
        assert torch.equal(idx[si], torch.cat([a[1][si] for a in alone])), si
    torch.testing.assert_close(img, torch.cat([a[0] for a in alone]), rtol=0, atol=1e-4)
    if kw.get('iter_exit') == 'row' and labels:     # the images stopped at other iterations: the exit was per image
        assert any(len(set(n)) > 1 for n in trace['iters_per_image']), trace['iters_per_image']
    assert len({tuple(t.tolist()) for t in idx[-1]}) == 3


class RowsAndCaches:
    """Counts the rows the implicit block computes; after every scale, copies the implicit block's cached keys and
    values of that scale for every iteration index still cached."""

    def __init__(self, model):
        self.model, self.rows, self.slots = model, 0, []
        bb = model.backbone
        self.handle = model.implicit_block.register_forward_hook(lambda m, a, out: self._count(out))
        inner = bb.sample_scale

        def wrapped(x_BlC, adas, si, *args, **kwargs):
            out = inner(x_BlC, adas, si, *args, **kwargs)
            l = x_BlC.shape[1]
            caches = model.implicit_block.attn.kv_caches
            self.slots.append({j: tuple(t.clone() for t in c.last_slot(l)) for j, c in caches.items()})
            return out
        bb.sample_scale = wrapped

    def _count(self, out):
        self.rows += out.shape[0]

    def remove(self):
        self.handle.remove()
        self.model.backbone.__dict__.pop('sample_scale', None)


def test_row_exit_computes_active_rows_only_and_fills_the_later_caches(viar):
    """Every row the implicit block computes is an iteration of an active image (no masked rows); after a scale, an
    image that ran i iterations has, in the cache of every later iteration index that a later scale still reads, the
    keys and values of its last iteration (index i - 1); the indices it ran hold their own keys."""
    trace, hooks, B, n = {}, RowsAndCaches(viar), 3, 10
    try:
        sample(viar, (n, n), B=B, iter_tol=3e-4, iter_exit='row', trace=trace)
    finally:
        hooks.remove()
    per_image = trace['iters_per_image']
    assert hooks.rows == 2 * sum(map(sum, per_image))
    assert any(len(set(ns)) > 1 for ns in per_image[:-1]), per_image
    for si, (ns, slots) in enumerate(zip(per_image[:-1], hooks.slots)):
        assert sorted(slots) == list(range(n))      # a later scale runs up to n iterations: every index is kept
        for b, i in enumerate(ns):
            for r in (b, B + b):
                for j in range(i, n):
                    assert all(torch.equal(slots[j][t][r], slots[i - 1][t][r]) for t in (0, 1)), (si, r, j)
                assert not torch.equal(slots[i - 1][0][r], slots[0][0][r]) or i == 1


def test_row_exit_stops_each_image_on_its_own_residual(viar):
    """The per-row residuals of the trace against the stop rule: an image ran i iterations of a scale iff both its
    rows are <= tol at iteration i and not before (or i is the maximum); after it stopped its rows are NaN."""
    trace, tol, B = {}, 3e-4, 3
    sample(viar, (10, 10), B=B, iter_tol=tol, iter_exit='row', trace=trace)
    for R, ns, top in zip(trace['residual_rows'], trace['iters_per_image'], trace['iters']):
        assert R.shape == (top, 2 * B) and max(ns) == top
        for b, i in enumerate(ns):
            pair = torch.maximum(R[:, b], R[:, B + b])
            below = [bool(v <= tol) for v in pair[:i]]
            assert not any(below[:-1]) and (below[-1] or i == 10)
            assert torch.isnan(pair[i:]).all()


def test_anderson_step_on_a_linear_contraction():
    """Rows are solved independently (a row alone gets the same iterates up to rounding); the first step is the plain
    step (beta 1) or the damped one; on f(x) = A x + b, Anderson reaches 1e-6 in fewer evaluations than Picard."""
    from models.var import anderson_step
    gen = torch.Generator().manual_seed(0)
    D, R = 12, 4
    A = torch.randn(R, D, D, generator=gen, dtype=torch.float64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2).view(R, 1, 1)
    bvec = torch.randn(R, D, 1, generator=gen, dtype=torch.float64)
    f = lambda x: (A[:x.shape[0]] @ x.double().view(x.shape[0], D, 1) + bvec[:x.shape[0]]).view(x.shape).float()
    x0 = torch.zeros(R, 3, 4)
    g0 = f(x0)
    assert anderson_step(None, x0, g0, 5)[0] is g0
    torch.testing.assert_close(anderson_step(None, x0, g0, 5, beta=0.5)[0], 0.5 * g0)

    def solve(solver, rows=R, steps=60):
        x, hist = x0[:rows], None
        for k in range(1, steps + 1):
            g = f(x)
            if ((g - x).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)).max() < 1e-6:
                return k, x
            x, hist = anderson_step(hist, x, g, 5) if solver == 'anderson' else (g, None)
        return steps, x
    (ka, xa), (kp, _) = solve('anderson'), solve('picard')
    assert ka < kp, (ka, kp)
    torch.testing.assert_close(solve('anderson', rows=1)[1], xa[:1], rtol=1e-5, atol=1e-6)


def test_warm_start_changes_the_first_iterate_of_every_scale_but_the_first(viar):
    """The first scale has no previous fixed point (same residuals); every later scale starts elsewhere than u (other
    first residual); a warm start from the previous scale's fixed point starts closer to its own fixed point on this
    model (smaller first residual, median over rows)."""
    from models.var import upsample_tokens
    cold, warm = {}, {}
    sample(viar, (10, 10), B=3, trace=cold)
    sample(viar, (10, 10), B=3, trace=warm, warm_start=True)
    assert torch.equal(cold['residual_rows'][0], warm['residual_rows'][0])
    for c, w in zip(cold['residual_rows'][1:], warm['residual_rows'][1:]):
        assert not torch.equal(c[0], w[0])
    z = torch.randn(2, 1, 8).expand(2, 1, 8)
    torch.testing.assert_close(upsample_tokens(z, 9), z.expand(2, 9, 8))


@pytest.mark.parametrize('kw, message', [
    (dict(iter_exit='image'), 'iter_exit must be one of batch, row'),
    (dict(iter_solver='newton'), 'iter_solver must be one of picard, anderson'),
    (dict(iter_solver='anderson', anderson_m=0), 'anderson_m must be an int >= 1'),
    (dict(anderson_beta=0.0), r'anderson_beta must be in \(0, 1\]'),
    (dict(g_seed=[1, 2, 3]), 'g_seed has 3 seeds for B=2'),
])
def test_bad_fixed_point_settings_are_refused(viar, kw, message):
    with pytest.raises(ValueError, match=message):
        sample(viar, **{'g_seed': 3, **kw})


def test_fixed_point_flags_reach_the_sampler_the_folder_name_and_the_config():
    import sampling
    from utils.sampling_utils import SamplingError, check_args, sampler_kwargs
    args = sampling.parse_args(['--use_implicit', '--iter_tol', '0.05', '--iter_exit', 'row', '--iter_solver',
                                'anderson', '--anderson_m', '3', '--warm_start'])
    kw = sampler_kwargs(args)
    assert {k: kw[k] for k in ('iter_tol', 'iter_exit', 'iter_solver', 'anderson_m', 'warm_start')} == dict(
        iter_tol=0.05, iter_exit='row', iter_solver='anderson', anderson_m=3, warm_start=True)
    assert 'anderson_beta' not in kw
    assert sampling.folder_name(args, 16) == f'implicit-{VIAR_MODEL}-cfg-1.5-tol0.05-row-anderson3-warm-seed-1'
    from utils.folder_sampling import image_settings
    settings = image_settings({'ckpt': VIAR_MODEL}, 1, 50, 25, kw, True, None)
    assert settings['iter_exit'] == 'row' and settings['warm_start'] is True and settings['anderson_m'] == 3
    # today's values spelled out change nothing: same keywords, folder and recorded settings as without them
    plain = sampling.parse_args(['--use_implicit'])
    spelled = sampling.parse_args(['--use_implicit', '--iter_exit', 'batch', '--iter_solver', 'picard',
                                   '--anderson_m', '7', '--warm_start', 'false'])
    assert sampler_kwargs(spelled) == sampler_kwargs(plain)
    assert sampling.folder_name(spelled, 16) == sampling.folder_name(plain, 16) == (
        f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1')
    with pytest.raises(SamplingError, match=r'--anderson_m 0 must be >= 1.*--anderson_beta 2.0 must be in \(0, 1\]'):
        check_args(sampling.parse_args(['--anderson_m', '0', '--anderson_beta', '2']))


# ============================================== the model: the trace ==================================================
class Iterates:
    """Forward hooks on the last pre block (u = z_0) and on the implicit block (z_1, z_2, ...): the iterates of every
    scale, as the model computed them, collected independently of the trace."""

    def __init__(self, model):
        self.scales = []
        self.handles = [model.pre_blocks[-1].register_forward_hook(lambda m, a, out: self.scales.append([out])),
                        model.implicit_block.register_forward_hook(lambda m, a, out: self.scales[-1].append(out))]

    def residuals(self):
        """Per scale: (rows (iterations, 2B), whole batch [iterations]) recomputed in float64."""
        out = []
        for zs in self.scales:
            zs = [z.double().flatten(1) for z in zs]
            rows = [torch.linalg.vector_norm(b - a, dim=1) / torch.linalg.vector_norm(b, dim=1)
                    for a, b in zip(zs, zs[1:])]
            whole = [(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(b)).item() for a, b in zip(zs, zs[1:])]
            out.append((torch.stack(rows) if rows else torch.zeros(0, zs[0].shape[0], dtype=torch.float64), whole))
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize('iters, iter_tol', [((10, 4), None), ((8, 8), 3e-3), ((0, 3), None)])
def test_reported_residuals_equal_a_recomputation_from_the_iterates(viar, iters, iter_tol):
    hooks, trace, B = Iterates(viar), {}, 3
    try:
        sample(viar, iters, B=B, iter_tol=iter_tol, trace=trace)
    finally:
        hooks.remove()
    mine = hooks.residuals()
    assert len(mine) == len(PNS) == len(trace['iters']) == len(trace['residual']) == len(trace['residual_rows'])
    for k, ((rows, whole), n) in enumerate(zip(mine, trace['iters'])):
        assert rows.shape == (n, 2 * B) and trace['residual_rows'][k].shape == (n, 2 * B)
        assert len(trace['residual'][k]) == n
        torch.testing.assert_close(trace['residual_rows'][k].double(), rows, rtol=1e-5, atol=0)
        assert trace['residual'][k] == pytest.approx(whole, rel=1e-5)
        if iter_tol is not None:       # the stop rule on the recomputed residuals: first iteration with all rows <= tol
            below = [bool(r.max() <= iter_tol) for r in rows]
            assert not any(below[:-1]) and (below[-1] or n == iters[0])
    if iter_tol is not None:
        assert any(n < iters[0] for n in trace['iters']), 'the tolerance should stop some scale early'


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_the_trace_leaves_images_unchanged(viar, dtype):
    traced, trace = {}, {}
    assert_same(sample(viar, (10, 5), dtype=dtype, trace=traced), sample(viar, (10, 5), dtype=dtype))
    assert_same(sample(viar, (10, 5), dtype=dtype, iter_tol=3e-3, trace=trace),
                sample(viar, (10, 5), dtype=dtype, iter_tol=3e-3))
    assert traced['iters'] == [10, 8, 6, 5] and all(r.dtype == torch.float32 for r in traced['residual_rows'])


# ============================================== scripts/fixed_point.py ================================================
@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """vae.pth, var.pth and the VIAR file (named as the published one) of the tiny models above."""
    d = tmp_path_factory.mktemp('ckpts')
    for implicit in (False, True):
        vae, model = tiny(implicit)
        torch.save(model.state_dict(), d / (VIAR_MODEL if implicit else 'var.pth'))
    torch.save(vae.state_dict(), d / 'vae.pth')
    return d


def my_units_tokens_and_rows(model, classes, per_class, batch_size, seed, n, trace):
    """sampling.py's units done here by hand: class c, batch i -> g_seed = seed + i, top-k 900 clamped to V=64."""
    tokens, rows = [], [[] for _ in PNS]
    for c in classes:
        for i, lo in enumerate(range(0, per_class, batch_size)):
            b, tr = min(batch_size, per_class - lo), ({} if trace else None)
            with torch.inference_mode():
                _, idx = model.autoregressive_infer_cfg(B=b, label_B=torch.tensor([c] * b), g_seed=seed + i, cfg=1.5,
                                                        top_k=64, top_p=0.96, iter_left=n, iter_right=n,
                                                        ret_idx_Bl=True, trace=tr)
            tokens.append(torch.cat(idx, dim=1))
            for k in range(len(PNS)) if trace else ():
                rows[k].append(tr['residual_rows'][k].double())
    return torch.cat(tokens), [torch.cat(r, dim=1) for r in rows] if trace else None


def test_fixed_point_diagnostics(ckpts, tmp_path, viar):
    import json
    import statistics

    from scripts import fixed_point
    from utils.misc import png_is_valid
    out = tmp_path / 'fp'
    argv = ['--var_ckpt', str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'), '--classes', '1', '3',
            '--per_class', '3', '--batch_size', '2', '--seed', '5', '--max_iters', '7', '--ref_iters', '4',
            '--token_iters', '0,1,2,4,7', '--device', 'cpu', '--out', str(out)]
    assert fixed_point.main(argv) == 0
    doc = json.loads((tmp_path / 'fp.json').read_text())
    assert png_is_valid(tmp_path / 'fp.png')
    assert doc['images'] == 6 and doc['rows'] == 12 and doc['classes'] == [1, 3]

    # residual curves: the quantiles of the rows of my own traced run of the same units
    _, rows = my_units_tokens_and_rows(viar, [1, 3], 3, 2, 5, 7, trace=True)
    for k, s in enumerate(doc['residual']['per_scale']):
        assert rows[k].shape == (7, 12) and len(s['median']) == 7
        assert s['median'] == pytest.approx([statistics.median(r.tolist()) for r in rows[k]], rel=1e-12)
        assert s['max'] == pytest.approx(rows[k].max(dim=1).values.tolist(), rel=1e-12)
        assert all(a <= b <= c for a, b, c in zip(s['p10'], s['median'], s['p90']))
        first = [i + 1 for i in range(7) if rows[k][i].max() <= 1e-3]
        assert doc['stop_iteration']['0.001'][k] == (first[0] if first else None)

    # token change: my own n->n tokens against my own 4->4 tokens
    ref, _ = my_units_tokens_and_rows(viar, [1, 3], 3, 2, 5, 4, trace=False)
    tc = doc['token_change']
    assert tc['n'] == [0, 1, 2, 4, 7] and tc['fraction'][tc['n'].index(4)] == 0.0
    for n, frac, imgs in zip(tc['n'], tc['fraction'], tc['images_changed']):
        tokens, _ = my_units_tokens_and_rows(viar, [1, 3], 3, 2, 5, n, trace=False)
        assert frac == (tokens != ref).double().mean().item()
        assert imgs == (tokens != ref).any(dim=1).double().mean().item()
    assert tc['fraction'][0] > 0, 'no implicit iteration should change tokens of this model'


@pytest.mark.parametrize('which, extra, message', [
    ('var.pth', [], 'has no implicit block: the fixed-point diagnostics need a VIAR checkpoint'),
    (VIAR_MODEL, ['--classes', '9'], '--classes 9 is out of range'),
    (VIAR_MODEL, ['--max_iters', '0'], '--max_iters 0 must be >= 1'),
    (VIAR_MODEL, ['--token_iters', '1,x'], '--token_iters'),
    ('missing.pth', [], 'missing.pth'),
])
def test_fixed_point_bad_input_is_one_line(ckpts, tmp_path, capsys, which, extra, message):
    from scripts import fixed_point
    argv = ['--var_ckpt', str(ckpts / which), '--vae_ckpt', str(ckpts / 'vae.pth'), '--device', 'cpu',
            '--max_iters', '2', '--out', str(tmp_path / 'fp'), *extra]
    assert fixed_point.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('scripts.fixed_point: error:') and message in err[0], err
    assert not (tmp_path / 'fp.json').exists()


# ============================================== scripts/sweep.py ======================================================
def sweep_argv(ckpts, out, *extra):
    return ['--ckpts', str(ckpts / 'var.pth'), str(ckpts / VIAR_MODEL), '--vae_ckpt', str(ckpts / 'vae.pth'),
            '--schedules', '3-3,3-3', '--num_classes', '2', '--per_class', '4', '--batch_size', '2',   # one point
            '--time_batches', '1', '--time_warmup', '0', '--device', 'cpu', '--out', str(out), *extra]


@pytest.fixture(scope='module')
def golden_eval(tmp_path_factory):
    """(a writable copy of the parity vectors' reference batch, the stand-in Inception graph)."""
    from tests.golden.make import DATA
    gold = DATA / 'evaluator'
    ref = tmp_path_factory.mktemp('ref') / 'ref_batch.npz'
    ref.write_bytes((gold / 'ref_batch.npz').read_bytes())
    return ref, gold / 'stand_in_inception.pb'


def test_sweep_table_holds_the_evaluators_numbers(ckpts, golden_eval, tmp_path, monkeypatch, viar):
    """Two operating points (VAR; VIAR 3->3) sampled, measured and scored; the table's FID, sFID, IS, precision and
    recall are those of evaluator.py's functions on the same npz files, computed here; the npz holds the model's
    own images (sampling.py's seeding); the KV-cache bytes are exactly those of the shapes; a second run reuses
    everything."""
    pytest.importorskip('tensorflow')
    import json

    import numpy as np

    import evaluator
    from scripts import sweep
    from utils.misc import png_is_valid
    from utils.sampling_utils import to_uint8
    ref, graph = golden_eval
    out = tmp_path / 'sw'
    argv = sweep_argv(ckpts, out, '--ref_batch', str(ref), '--inception', str(graph))
    assert sweep.main(argv) == 0
    doc = json.loads((out / 'sweep.json').read_text())
    rows = {r['point']: r for r in doc['points']}
    label = f'{ckpts.name}-'
    assert list(rows) == [label + 'var', label + 'viar-it3-3'] and png_is_valid(out / 'pareto.png')

    model = evaluator.InceptionFeatures(str(graph))
    ref_pool, ref_spatial = model.activations(evaluator.NpzImages(str(ref)), 64, 'ref')
    ref_stats = evaluator.feature_statistics(ref_pool) + evaluator.feature_statistics(ref_spatial)
    md = (out / 'sweep.md').read_text()
    for r in rows.values():
        pool, spatial = model.activations(evaluator.NpzImages(r['npz']), 64, 'sample')
        mu, sigma, mu_s, sigma_s = evaluator.feature_statistics(pool) + evaluator.feature_statistics(spatial)
        assert r['fid'] == pytest.approx(evaluator.frechet_distance(mu, sigma, *ref_stats[:2]), rel=1e-6)
        assert r['sfid'] == pytest.approx(evaluator.frechet_distance(mu_s, sigma_s, *ref_stats[2:]), rel=1e-6)
        assert r['inception_score'] == pytest.approx(evaluator.inception_score(model.class_probs(pool)), rel=1e-6)
        precision, recall = evaluator.precision_recall(ref_pool, pool, distances=model.pairwise_sq_distances)
        assert (r['precision'], r['recall']) == (precision, recall)
        assert f'| {r["point"]} | {r["model"]} |' in md and f'{r["fid"]:.2f}' in md
        assert r['images'] == 8 and r['images_timed'] == 2 and r['images_s'] > 0 and r['peak_mem_mb'] > 0

    # the point's settings reach sampling.py: class 1, batch 1 (images 6, 7) is the model's g_seed = 1 + 1, 3->3
    with torch.inference_mode():
        img = viar.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 1]), g_seed=2, cfg=1.5, top_k=64, top_p=0.96,
                                            iter_left=3, iter_right=3)
    with np.load(rows[label + 'viar-it3-3']['npz']) as z:
        assert np.array_equal(z['arr_0'][6:8], to_uint8(img))
    # KV-cache bytes from the shapes: k and v of 2B = 4 rows x 64 channels x fp32 per token, L = 30 tokens;
    # VAR-d1: one block; VIAR: pre + post blocks and one cache per iteration index
    per_token = 2 * 4 * 64 * 4 / 2 ** 20
    assert rows[label + 'var']['kv_cache_mb'] == per_token * 30
    assert rows[label + 'viar-it3-3']['kv_cache_mb'] == per_token * (2 * 30 + 3 * 30)
    assert rows[label + 'viar-it3-3']['iters_run'] == [3, 3, 3, 3] and rows[label + 'var']['iters_run'] is None

    # resuming: nothing is sampled, timed or scored again
    def fail(*a, **k):
        raise AssertionError('should have been reused')
    monkeypatch.setattr(sweep, 'measure_point', fail)
    monkeypatch.setattr(sweep, 'score_point', fail)
    from utils import folder_sampling
    monkeypatch.setattr(folder_sampling, 'sample_batch', fail)
    assert sweep.main(argv) == 0
    assert json.loads((out / 'sweep.json').read_text())['points'] == doc['points']


def test_sweep_under_torchrun_gives_the_same_npz(ckpts, tmp_path):
    """Two processes sample the units of each point between them; the npz equals a one-process run's byte for byte,
    and rank 0 alone measures (no reference batch: nothing is scored)."""
    import os
    import socket
    import subprocess
    import sys

    from scripts import sweep
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=repo)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={port}', '-m', 'scripts.sweep', *sweep_argv(ckpts, tmp_path / 'two')]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '2 process(es)' in r.stdout and r.stdout.count('[sweep] timing') == 2
    assert sweep.main(sweep_argv(ckpts, tmp_path / 'one')) == 0
    for name in ('var', 'viar-it3-3'):
        point = f'{ckpts.name}-{name}'
        one, two = ([p for p in (tmp_path / run / 'samples' / point).iterdir() if p.suffix == '.npz'] for run in
                    ('one', 'two'))
        assert len(one) == len(two) == 1 and one[0].read_bytes() == two[0].read_bytes()
    assert not (tmp_path / 'two' / 'pareto.png').exists() and (tmp_path / 'two' / 'sweep.md').is_file()


def test_sweep_variants_and_seed_sets(ckpts, tmp_path, viar):
    """Tolerance points once per --variants entry (row exit, Anderson, warm start reach sampling.py's folder and the
    images), every point once per --seed set (each set's npz holds that seed's images), the report's mean and
    standard deviation over the sets."""
    import json
    import statistics

    import numpy as np

    from scripts import sweep
    from utils.sampling_utils import to_uint8
    out = tmp_path / 'sw'
    argv = sweep_argv(ckpts, out, '--iter_tols', '1e-3', '--variants', 'batch', 'row+anderson+warm', '--seed', '1',
                      '5', '--time_batches', '2')
    argv[argv.index('--ckpts') + 1:argv.index('--vae_ckpt')] = [str(ckpts / VIAR_MODEL)]
    assert sweep.main(argv) == 0
    rows = {r['point']: r for r in json.loads((out / 'sweep.json').read_text())['points']}
    name = f'{ckpts.name}-viar-it10-10-tol0.001'
    assert list(rows) == [f'{ckpts.name}-viar-it3-3', name, name + '-row-anderson-warm']
    r = rows[name + '-row-anderson-warm']
    assert r['label'] == '10->10 tol 0.001 row anderson warm' and r['seeds'] == [1, 5]
    assert (r['iter_exit'], r['iter_solver'], r['warm_start']) == ('row', 'anderson', True)
    assert len(r['images_s_all']) == 2 and r['images_s'] == pytest.approx(statistics.mean(r['images_s_all']))
    assert r['images_s_sd'] == pytest.approx(statistics.stdev(r['images_s_all']))
    assert [os.path.basename(p) for p in r['npz_all']] == [
        f'implicit-{VIAR_MODEL}-cfg-1.5-tol0.001-row-anderson5-warm-seed-{s}.npz' for s in (1, 5)]
    with torch.inference_mode():    # class 1, batch 1 of seed set 5: g_seed 6
        img = viar.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 1]), g_seed=6, cfg=1.5, top_k=64, top_p=0.96,
                                            iter_left=10, iter_right=10, iter_tol=1e-3, iter_exit='row',
                                            iter_solver='anderson', warm_start=True)
    with np.load(r['npz_all'][1]) as z:
        assert np.array_equal(z['arr_0'][6:8], to_uint8(img))
    assert ' ± ' in (out / 'sweep.md').read_text()


@pytest.mark.parametrize('extra, message', [
    (['--schedules', '10to5'], "could not read the iteration schedule --schedules '10to5'"),
    (['--iter_tols', '0.1', '--variants', 'row+fast'], "could not read the variant 'row+fast'"),
    (['--variants', 'batch+row'], "could not read the variant 'batch+row'"),
    (['--seed', '1', '2'], '--seed 1 2 overlap: a seed set uses g_seed = seed + i for the 2 batches'),
    (['--anderson_m', '0'], '--anderson_m 0 must be >= 1'),
    (['--iter_tols', '1e-2,-1'], '--iter_tols -1 must be >= 0'),
    (['--iter_tols', 'tight'], "could not read the tolerance 'tight'"),
    (['--per_class', '0'], '--per_class 0 must be >= 1'),
    (['--ref_batch', 'nowhere.npz'], "--ref_batch 'nowhere.npz' not found"),
    (['--num_classes', '9'], '--num_classes 9 but'),
    (['--ckpts', 'missing.pth'], "'missing.pth' not found"),
])
def test_sweep_bad_input_is_one_line(ckpts, tmp_path, capsys, extra, message):
    from scripts import sweep
    assert sweep.main(sweep_argv(ckpts, tmp_path / 'sw') + extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('scripts.sweep: error:') and message in err[0], err
    assert not (tmp_path / 'sw').exists()


def test_reference_folder_is_packed_once(tmp_path):
    """--ref_batch as a folder of images (an ImageFolder, e.g. the demo's val/ split): packed in sorted path order
    into OUT/ref_batch.npz, reused by the next run while the files are unchanged; images of several sizes are
    refused."""
    import argparse

    import numpy as np
    from PIL import Image

    from scripts import sweep
    rng = np.random.default_rng(0)
    imgs = {f'{c}/{k}.png': rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for c in ('b', 'a') for k in range(3)}
    for name, arr in imgs.items():
        (tmp_path / 'ref' / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / 'ref' / name)
    args = argparse.Namespace(ref_batch=str(tmp_path / 'ref'), out=str(tmp_path / 'out'))
    npz = sweep.reference_npz(args)
    assert npz == str(tmp_path / 'out' / 'ref_batch.npz')
    with np.load(npz) as z:
        assert np.array_equal(z['arr_0'], np.stack([imgs[n] for n in sorted(imgs)]))
    mtime = (tmp_path / 'out' / 'ref_batch.npz').stat().st_mtime_ns
    assert sweep.reference_npz(args) == npz and (tmp_path / 'out' / 'ref_batch.npz').stat().st_mtime_ns == mtime
    Image.fromarray(imgs['a/0.png'][::-1]).save(tmp_path / 'ref' / 'a' / '0.png')     # changed: packed again
    with np.load(sweep.reference_npz(args)) as z:
        assert np.array_equal(z['arr_0'][0], imgs['a/0.png'][::-1])
    Image.fromarray(imgs['a/0.png'][:8]).save(tmp_path / 'ref' / 'a' / 'small.png')
    with pytest.raises(sweep.SweepError, match='the images differ in size'):
        sweep.reference_npz(args)
