"""scripts/bench.py (``python -m scripts.bench``) on CPU: the analytic FLOP count matches PyTorch's FLOP counter, and a
tiny end-to-end run prints the tables, writes JSON and a PNG, and shows the KV-cache and JFB-memory claims (both
deterministic: bytes, not timings); FlexVAR models over several schedules of scales the same way."""
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import iterations_per_scale
from scripts import bench

TINY = ['--device', 'cpu', '--threads', '1', '--width', '64', '--vae_ch', '32', '--patch_nums', '1_2_3',
        '--batch_sizes', '1', '--reps', '1', '--warmup', '0', '--matmul_n', '256']


@pytest.fixture(autouse=True)
def keep_threads():     # one thread: quick and steady on a shared 2-core machine; restored afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('name, sched', [('viar_d30', (3, 1)), ('var_d16', (0, 0))])
def test_analytic_flops_match_pytorch_flop_counter(name, sched):
    torch.manual_seed(0)
    vae, var = bench.build(name, 64, 32, 'cpu', (1, 2, 3))
    B = 2
    schedule = iterations_per_scale(*sched, 3) if var.use_implicit else [0] * 3
    counters = []

    def around():
        counters.append(FlopCounterMode(display=False))
        return counters[-1]

    probe = bench.Probe(var, vae, 'cpu', around=around)
    try:     # the math kernel of SDPA is made of matmuls the counter sees
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
            var.autoregressive_infer_cfg(B, torch.tensor([0, 1]), g_seed=0, iter_left=sched[0], iter_right=sched[1])
    finally:
        probe.remove()
    assert 'sample_scale' not in var.backbone.__dict__          # instrumentation removed
    measured = sum(c.get_total_flops() for c in counters)
    expected = bench.sampler_flops(var, B, schedule)
    assert expected['attention'] > 0 and expected['head'] > 0
    assert measured == expected['total'], (measured, expected)


def test_bench_runs_tiny_and_shows_the_claims(tmp_path):
    out_json, out_png = tmp_path / 'b.json', tmp_path / 'b.png'
    args = bench.get_parser().parse_args(TINY + [
        '--models', 'viar_d30', '--schedules', '3-3,3-1,1-1', '--train_models', 'viar_d30',
        '--train_grid', '0-1,4-1,0-2,0-3', '--train_bs', '1', '--json', str(out_json), '--plot', str(out_png)])
    assert bench.run(args) == 0
    doc = json.loads(out_json.read_text())
    assert doc['matmul_gflop_s']['fp32'] > 0 and doc['machine']['threads'] >= 1
    sample = {r['schedule']: r for r in doc['results'] if r['kind'] == 'sample' and r['model'] == 'viar_d30'}
    assert set(sample) == {'3->3', '3->1', '1->1'} and sample['3->1']['iters'] == [3, 2, 1]
    for r in sample.values():
        assert r['img_s'] > 0 and r['transformer_s'] > 0 and r['peak_mem_mb'] > 0 and 0 < r['frac_of_matmul']
    # fewer iterations: fewer KV-cache bytes (per-iteration caches), exactly as counted from the shapes
    kv = [sample[s]['kv_cache_mb'] for s in ('3->3', '3->1', '1->1')]
    assert kv[0] > kv[1] > kv[2] > 0
    C, B = 64, 1
    per_token = 2 * 2 * B * C * 4 / 2 ** 20                    # k and v, CFG rows, fp32
    # 10 explicit blocks (5 pre + 5 post) hold all 14 tokens; iteration i holds the scales that run it
    assert kv[0] == pytest.approx(per_token * (10 * 14 + 3 * 14))
    assert kv[2] == pytest.approx(per_token * (10 * 14 + 14))
    train = {(r['n0'], r['n1']): r['saved_act_mb'] for r in doc['results'] if r['kind'] == 'train'}
    assert train[(4, 1)] <= 1.15 * train[(0, 1)]                # no-gradient steps keep nothing
    step = train[(0, 2)] - train[(0, 1)]
    assert step > 0 and train[(0, 3)] - train[(0, 2)] == pytest.approx(step, rel=0.05)
    kv_checks = [c for c in doc['checks'] if 'KV-cache' in c['what']]
    assert len(kv_checks) == 3                                   # 3->1 < 3->3, 1->1 < 3->3, 1->1 < 3->1
    from utils.misc import png_is_valid
    assert png_is_valid(out_png)


@pytest.mark.parametrize('extra, message', [
    (['--models', 'var_d99'], 'unknown model'),
    (['--dtype', 'fp16'], 'fp16 autocast is a CUDA path'),
    (['--width', '100'], 'multiple of 64'),
    (['--patch_nums', '2_1'], 'must be increasing'),
    (['--models', 'flexvar_d16', '--infer_pn', '1_2_3,1_3_2'], '--infer_pn must be increasing and start at 1'),
])
def test_bad_flags_are_reported(extra, message):
    with pytest.raises(bench.BenchError, match=message):
        bench.run(bench.get_parser().parse_args(TINY + ['--train_models', 'none'] + extra))


def test_bad_flag_ends_in_one_line_from_the_command_line(repo_dir):
    p = subprocess.run([sys.executable, '-m', 'scripts.bench', *TINY, '--schedules', '10to5'], cwd=repo_dir,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert 'could not read the iteration schedule' in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_iter_tol_and_trace_rows(tmp_path, capsys):
    """``--iter_tol none,0,1e9 --trace``: every VIAR schedule is benched plain, traced, and under each tolerance;
    a tolerance of 0 runs the whole schedule, a huge one a single iteration per scale, with the KV-cache bytes and
    FLOPs of the 1->1 schedule exactly; the notes compare each run with the plain one."""
    out_json = tmp_path / 'b.json'
    args = bench.get_parser().parse_args(TINY + [
        '--models', 'viar_d30', '--schedules', '3-3,1-1', '--iter_tol', 'none,0,1e9', '--trace',
        '--train_models', 'none', '--json', str(out_json)])
    assert bench.run(args) == 0
    rows = [r for r in json.loads(out_json.read_text())['results'] if r['kind'] == 'sample']
    assert len(rows) == 2 * 3 * 2
    by = {(r['schedule'], r['iter_tol'], r['trace']): r for r in rows}
    assert by[('3->3', 0.0, False)]['iters_run'] == [3, 3, 3] and by[('3->3', 1e9, True)]['iters_run'] == [1, 1, 1]
    one = by[('1->1', None, False)]
    for trace in (False, True):
        huge = by[('3->3', 1e9, trace)]
        assert huge['kv_cache_mb'] == one['kv_cache_mb'] and huge['transformer_gflop'] == one['transformer_gflop']
        assert by[('3->3', None, trace)]['iters_total'] == 9 and by[('3->3', None, trace)]['trace'] is trace
    printed = capsys.readouterr().out
    assert '## Fixed-point trace and early exit' in printed
    assert 'viar_d30 B=1 fp32 3->3, iter_tol 1e+09 + trace:' in printed
    assert len([c for c in json.loads(out_json.read_text())['checks'] if 'KV-cache' in c['what']]) == 1


def test_bad_iter_tol_is_reported():
    with pytest.raises(bench.BenchError, match='--iter_tol -1 must be >= 0'):
        bench.run(bench.get_parser().parse_args(TINY + ['--train_models', 'none', '--iter_tol', 'none,-1']))
    with pytest.raises(bench.BenchError, match='could not read the tolerance'):
        bench.run(bench.get_parser().parse_args(TINY + ['--train_models', 'none', '--iter_tol', 'tight']))


@pytest.mark.parametrize('name, sched', [('flexvar_d16', (0, 0)), ('flexviar_d16', (3, 1))])
def test_flexvar_flops_of_another_schedule_match_pytorch_flop_counter(name, sched):
    """A FlexVAR model built on 1_2_3 and sampled over 1_2_4 (its decoder timed through ``codes_to_img``)."""
    torch.manual_seed(0)
    vae, var = bench.build(name, 64, 32, 'cpu', (1, 2, 3))
    B, pns = 2, (1, 2, 4)
    schedule = iterations_per_scale(*sched, 3) if var.use_implicit else [0] * 3
    counters = []

    def around():
        counters.append(FlopCounterMode(display=False))
        return counters[-1]

    probe = bench.Probe(var, vae, 'cpu', around=around)
    try:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
            img = var.autoregressive_infer_cfg(B, torch.tensor([0, 1]), infer_patch_nums=pns, g_seed=0,
                                               iter_left=sched[0], iter_right=sched[1])
    finally:
        probe.remove()
    assert img.shape == (B, 3, 64, 64) and probe.t_decoder > 0
    assert 'codes_to_img' not in vae.__dict__ and 'sample_scale' not in var.backbone.__dict__
    assert sum(c.get_total_flops() for c in counters) == bench.sampler_flops(var, B, schedule, pns)['total']


def test_bench_flexvar_schedules_of_scales(tmp_path, capsys):
    """--infer_pn 1_2_3,1_3: a row per schedule (and per iteration schedule for the implicit FlexVAR); the shorter
    schedule holds the KV-cache bytes of its tokens exactly, and the check compares the two; training runs on the
    default scales."""
    out_json = tmp_path / 'b.json'
    args = bench.get_parser().parse_args(TINY + [
        '--models', 'flexvar_d16,flexviar_d16', '--infer_pn', '1_2_3,1_3', '--schedules', '2-1',
        '--train_models', 'flexvar_d16', '--json', str(out_json)])
    assert bench.run(args) == 0
    doc = json.loads(out_json.read_text())
    rows = {(r['model'], r['infer_pn']): r for r in doc['results'] if r['kind'] == 'sample'}
    assert set(rows) == {(m, pn) for m in ('flexvar_d16', 'flexviar_d16') for pn in ('1_2_3', '1_3')}
    per_token = 2 * 2 * 1 * 64 * 4 / 2 ** 20                    # k and v, CFG rows of B=1, width 64, fp32
    for pn, L in (('1_2_3', 14), ('1_3', 10)):
        r = rows[('flexvar_d16', pn)]
        assert r['kv_cache_mb'] == pytest.approx(per_token * 16 * L) and r['img_s'] > 0 and r['decoder_s'] > 0
        assert r['schedule'] == '-' and r['iters'] is None
    assert rows[('flexviar_d16', '1_2_3')]['iters'] == [2, 1, 1] and rows[('flexviar_d16', '1_3')]['iters'] == [2, 1]
    assert rows[('flexvar_d16', '1_3')]['transformer_gflop'] < rows[('flexvar_d16', '1_2_3')]['transformer_gflop']
    checks = [c['what'] for c in doc['checks']]
    assert any(c.startswith('flexvar_d16 B=1 fp32: scales 1_3 (2 steps) vs 1_2_3 (3)') for c in checks), checks
    assert any(c.startswith('flexviar_d16 B=1 fp32 iterations 2->1: scales 1_3') for c in checks), checks
    (train,) = [r for r in doc['results'] if r['kind'] == 'train']
    assert train['model'] == 'flexvar_d16' and train['step_s'] > 0
    assert '| scales |' in capsys.readouterr().out
