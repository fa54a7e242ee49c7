"""Sampling and training benchmarks for VAR, VIAR and FlexVAR (random weights of the published shapes).

  python -m scripts.bench                                   # CPU: narrow models (width 128), a few minutes
  python -m scripts.bench --device cuda --dtype fp16        # published widths, torch.cuda.max_memory_allocated
  python -m scripts.bench --json bench.json --plot bench.png

Sampling: images/s, the transformer's time and FLOP/s against this machine's matmul FLOP/s, peak memory and KV-cache
bytes across iteration schedules, batch sizes and FlexVAR schedules.  Training: step time and memory against the
fixed-point steps (n0, n1).  ``--width 0`` is the published width (64 x depth); timings are the best of ``--reps``
runs after ``--warmup``.  A bad flag ends with one line and exit status 1.  Details: docs/performance.md.
"""
import os

if __package__ in (None, ''):       # run as a file (python scripts/X.py): the repository's modules come first
    import _repo_path  # noqa: F401

import argparse
import ctypes
import json
import math
import platform
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from utils import dist
from utils.errors import UserError, run_cli
from utils.flags import FLEX_SCHEDULE_PRESETS, parse_iterations, parse_scales
from utils.sampling_utils import SLOW_BF16_NOTE, autocast, cpu_has_native_bf16, resolve_dtype

MODELS = {
    'var_d16': dict(depth=16),
    'var_d20': dict(depth=20),
    'var_d24': dict(depth=24),
    'var_d30': dict(depth=30),
    'viar_d30': dict(depth=30, use_implicit=True, pre_depth=5, post_depth=5),
    # FlexVAR (github jiaosiyu1999/FlexVAR): the published FlexVAR-d{16,20,24} on its tokenizer (V 8912, Cvae 32)
    'flexvar_d16': dict(depth=16, flex=True),
    'flexvar_d20': dict(depth=20, flex=True),
    'flexvar_d24': dict(depth=24, flex=True),
    'flexviar_d16': dict(depth=16, flex=True, use_implicit=True, pre_depth=5, post_depth=5),   # not published
}
DTYPES = ('fp32', 'bf16', 'fp16')
# RTX 4090, 256 px, from the paper (VIAR with lowered per-scale iterations)
PAPER = {'var_d30': dict(img_s=15.16, mem_gb=19.24), 'viar_d30': dict(img_s=32.08, mem_gb=8.53)}


class BenchError(UserError):
    """A user-caused problem (bad flag, unavailable device): printed as one line (``run_cli``)."""


# ============================================== model and counting ====================================================
def build(name, width, vae_ch, device, patch_nums):
    """(vae, var) with the published structure of ``name`` at ``width`` channels (0: published), random weights;
    ``vae_ch`` 0: the published tokenizer width (VQVAE 160, FlexVAE 128).  A FlexVAR model's ``patch_nums`` is its
    default schedule (the one training runs); it samples any other."""
    from models import VAR, VQVAE, FlexVAE, FlexVAR
    cfg = MODELS[name]
    depth = cfg['depth']
    C = width or 64 * depth
    if C % 64:
        raise BenchError(f'--width must be a multiple of 64 (heads of 64 channels), got {C}')
    flex = cfg.get('flex', False)
    with torch.device('meta'):
        if flex:
            vae = FlexVAE(vocab_size=8912, Cvae=32, ch=vae_ch or 128, z_channels=256, v_patch_nums=patch_nums)
        else:
            vae = VQVAE(vocab_size=4096, z_channels=32, ch=vae_ch or 160, test_mode=True, share_quant_resi=4,
                        v_patch_nums=patch_nums)
        var = (FlexVAR if flex else VAR)(
            vae_local=vae, num_classes=1000, depth=depth, embed_dim=C, num_heads=C // 64,
            drop_path_rate=0.1 * depth / 24, attn_l2_norm=True, patch_nums=patch_nums,
            use_implicit=cfg.get('use_implicit', False), pre_depth=cfg.get('pre_depth', 5),
            post_depth=cfg.get('post_depth', 5))
    vae.to_empty(device=device)
    var.to_empty(device=device)
    with torch.no_grad():
        vae.init_weights()
        var.init_weights()
    return vae.eval(), var.eval()


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sampler_flops(var, B: int, schedule, patch_nums=None) -> dict:
    """FLOPs of the transformer part of one ``autoregressive_infer_cfg`` call (2B rows: CFG), counted from the
    shapes: per block call 24 R C^2 (qkv 6, proj 2, fc1 8, fc2 8) and 4 R ctx C for QK^T and AV over the ``ctx``
    keys it sees; per implicit step the projection (8 R C^2: W[:, :C] z and the 2C -> C layer), per scale the
    input injection (4 R C^2) and the head (2 R C V + the AdaLN before it).  R = 2B * tokens of the scale.
    ``patch_nums``: the scales sampled (a FlexVAR schedule; default the model's)."""
    C, V = var.C, var.V
    n_explicit = var.pre_depth + var.post_depth if var.use_implicit else var.depth
    linear = attention = head = 0
    ctx = 0
    ctx_per_iter = defaultdict(int)
    for k, pn in enumerate(patch_nums or var.patch_nums):
        l = pn * pn
        R = 2 * B * l
        ctx += l
        linear += n_explicit * 24 * R * C * C
        attention += n_explicit * 4 * R * ctx * C
        n = schedule[k] if var.use_implicit else 0
        if n > 0:
            linear += 4 * R * C * C                     # injection W[:, C:] u + b, once per scale
        for i in range(n):
            ctx_per_iter[i] += l
            linear += 8 * R * C * C + 24 * R * C * C    # projection + implicit block
            attention += 4 * R * ctx_per_iter[i] * C
        head += 2 * R * C * V + 2 * (2 * B) * var.D * 2 * C
    return dict(linear=linear, attention=attention, head=head, total=linear + attention + head)


def matmul_flops_per_s(device, dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an n x n x n matmul in ``dtype``: the machine's practical matmul limit.  It is
    run as ``F.linear`` (x W^T), the kernel every layer of the model calls (for fp32 the same BLAS call as
    ``torch.mm``; for bf16 on CPU ``torch.mm`` takes a much slower path than the oneDNN one ``F.linear`` uses)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    F.linear(a, b)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        F.linear(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def trim_host_memory():
    """Returns freed memory (heap pages to the OS, the CUDA caching allocator's blocks) so that the next
    measurement starts from a clean base."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Probe:
    """Wraps the transformer part of the sampler (``backbone.sample_scale`` and ``get_logits``) and the decoder
    (``vae.fhat_to_img``; FlexVAE: ``codes_to_img``) to time them, the KV caches to record their peak bytes, and
    VIAR's fixed-point step to count the iterations each scale ran (``iters_run``; fewer than the schedule's under
    ``iter_tol``).  ``around`` (a context factory) can replace the timer, e.g. with
    ``torch.utils.flop_counter.FlopCounterMode``."""

    def __init__(self, var, vae, device, around=None):
        self.var, self.device, self.around = var, torch.device(device), around
        self.t_transformer = self.t_decoder = 0.0
        self.kv_peak = 0
        self.iters_run, self._steps = [], 0
        self._events = []
        bb = var.backbone
        decoder = 'codes_to_img' if hasattr(vae, 'codes_to_img') else 'fhat_to_img'
        self._saved = [(bb, 'sample_scale'), (var, 'get_logits'), (vae, decoder)]
        bb.sample_scale = self._timed(bb.sample_scale, 't_transformer', kv=True)
        if bb.is_implicit:
            self._saved.append((bb, 'implicit_step'))
            bb.implicit_step = self._counted(bb.implicit_step)
        var.get_logits = self._timed(var.get_logits, 't_transformer')
        setattr(vae, decoder, self._timed(getattr(vae, decoder), 't_decoder', counted=False))
        for b in var.all_blocks():      # the implicit block frees per-iteration caches inside sample_scale
            self._saved.append((b.attn, 'free_cache'))
            b.attn.free_cache = self._before_free(b.attn.free_cache)

    def _timed(self, fn, field, kv=False, counted=True):
        def wrapper(*args, **kwargs):
            ctx = self.around() if (self.around is not None and counted) else nullcontext()
            if self.device.type == 'cuda':     # CUDA events: no synchronisation, the host keeps running ahead
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                with ctx:
                    out = fn(*args, **kwargs)
                end.record()
                self._events.append((field, start, end))
            else:
                t0 = time.perf_counter()
                with ctx:
                    out = fn(*args, **kwargs)
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
            if kv:      # the end of a scale
                self.kv_peak = max(self.kv_peak, self.var.kv_cache_nbytes())
                self.iters_run.append(self._steps)
                self._steps = 0
            return out
        return wrapper

    def _counted(self, fn):
        def wrapper(*args, **kwargs):    # a step on some rows only (VIAR's per-image exit) counts their share
            rows = kwargs.get('rows')
            self._steps += 1 if rows is None else len(rows[0]) / rows[1]
            return fn(*args, **kwargs)
        return wrapper

    def collect(self):
        """Adds up the CUDA event timings of the last call (after a synchronisation)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            for field, start, end in self._events:
                setattr(self, field, getattr(self, field) + start.elapsed_time(end) / 1e3)
            self._events = []

    def _before_free(self, fn):
        def wrapper(*args, **kwargs):
            self.kv_peak = max(self.kv_peak, self.var.kv_cache_nbytes())
            return fn(*args, **kwargs)
        return wrapper

    def reset(self):
        self.t_transformer = self.t_decoder = 0.0
        self.kv_peak = 0
        self.iters_run, self._steps = [], 0
        self._events = []

    def remove(self):
        for obj, name in self._saved:
            obj.__dict__.pop(name, None)


# ============================================== benchmarks ============================================================
def bench_sampling(var, vae, name, B, schedule_lr, args, device, dtype, peak_flops, variants=((None, False),),
                   infer_pn=None):
    """One schedule and batch size under each (iter_tol, trace) of ``variants`` (passed to
    ``autoregressive_infer_cfg``: VIAR's early exit; the fixed-point trace, a fresh dict per call); a row per variant,
    best of ``args.reps`` after ``args.warmup``.  The variants take turns within every repetition, so that a change
    of the machine's load during the run falls on all of them alike.  ``infer_pn``: a FlexVAR model's schedule of
    scales."""
    from models import iterations_per_scale
    from utils.memory import PeakMemory
    il, ir = schedule_lr if var.use_implicit else (0, 0)
    pns = tuple(infer_pn or var.patch_nums)
    schedule = iterations_per_scale(il, ir, len(pns)) if var.use_implicit else [0] * len(pns)
    flex_kw = {'infer_patch_nums': pns} if infer_pn else {}
    labels = torch.arange(B, device=device) % var.num_classes
    probe = Probe(var, vae, device)
    runs = {v: [] for v in variants}
    try:
        for rep in range(args.warmup + args.reps):
            for iter_tol, trace in variants:
                probe.reset()
                trim_host_memory()
                with PeakMemory(device) as mem, torch.inference_mode(), autocast(device, amp(dtype)):
                    sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    var.autoregressive_infer_cfg(B, labels, g_seed=rep, cfg=1.5, top_k=900, top_p=0.96,
                                                 iter_left=il, iter_right=ir, iter_tol=iter_tol,
                                                 trace={} if trace else None, **flex_kw)
                    sync(device)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                probe.collect()
                if rep >= args.warmup:
                    runs[(iter_tol, trace)].append(dict(
                        wall=wall, cpu=cpu, t_tf=probe.t_transformer, t_dec=probe.t_decoder, kv=probe.kv_peak,
                        peak=mem.peak, peak_delta=mem.delta, iters_run=probe.iters_run or schedule))
    finally:
        probe.remove()
    common = dict(kind='sample', model=name, width=var.C, params=num_params(var), B=B, dtype=args.dtype,
                  schedule=f'{il}->{ir}' if var.use_implicit else '-', iters=schedule if var.use_implicit else None,
                  infer_pn='_'.join(map(str, pns)) if infer_pn else None)
    return [dict(common, **sampling_row(var, B, rs, tol, trace, peak_flops, pns)) for (tol, trace), rs in runs.items()]


def sampling_row(var, B, runs, iter_tol, trace, peak_flops, patch_nums=None) -> dict:
    """The numbers of one variant: best times, largest memory, FLOPs of the iterations each run made (the same for
    every run of a fixed schedule) over the scales ``patch_nums`` (default the model's)."""
    best = {k: min(r[k] for r in runs) for k in ('wall', 'cpu', 't_tf', 't_dec')}
    best.update({k: max(r[k] for r in runs) for k in ('kv', 'peak', 'peak_delta')})
    flops = [sampler_flops(var, B, r['iters_run'], patch_nums)['total'] for r in runs]
    tf_flops_s = max(f / r['t_tf'] for f, r in zip(flops, runs))
    iters_run = [sum(col) / len(runs) for col in zip(*(r['iters_run'] for r in runs))]
    implicit = var.use_implicit
    return dict(
        iter_tol=iter_tol if implicit else None, trace=bool(trace and implicit),
        iters_run=iters_run if implicit else None, iters_total=sum(iters_run) if implicit else None,
        img_s=B / best['wall'], wall_s=best['wall'], cpu_s=best['cpu'], transformer_s=best['t_tf'],
        decoder_s=best['t_dec'], transformer_gflop=sum(flops) / len(flops) / 1e9, transformer_gflop_s=tf_flops_s / 1e9,
        frac_of_matmul=tf_flops_s / peak_flops, frac_pct=100 * tf_flops_s / peak_flops,
        peak_mem_mb=best['peak'] / 2 ** 20, peak_mem_delta_mb=best['peak_delta'] / 2 ** 20,
        kv_cache_mb=best['kv'] / 2 ** 20)


def bench_training(var, vae, name, B, n0, n1, args, device, dtype, grad_ckpt=False):
    from utils.memory import PeakMemory, SavedTensorMeter
    var.train()
    var.set_grad_checkpointing(grad_ckpt)
    var.cond_drop_rate = 0.1
    g = torch.Generator(device='cpu').manual_seed(0)
    x_BLCv = torch.randn(B, var.L - var.first_l, vae.Cvae, generator=g).to(device)
    label_B = torch.randint(0, var.num_classes, (B,), generator=g).to(device)
    gt_BL = torch.randint(0, vae.vocab_size, (B, var.L), generator=g).to(device)
    times, act_peak, mem_peak, mem_delta = [], 0, 0, 0
    for rep in range(args.warmup + args.reps):
        var.zero_grad(set_to_none=True)
        trim_host_memory()
        meter = SavedTensorMeter(var)
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            with meter:
                with autocast(device, amp(dtype)):
                    logits_BLV = var(label_B, x_BLCv, iters=(n0, n1) if var.use_implicit else None)
                    loss = F.cross_entropy(logits_BLV.view(-1, vae.vocab_size), gt_BL.view(-1))
                loss.backward()
            sync(device)
            dt = time.perf_counter() - t0
        del logits_BLV, loss
        if rep >= args.warmup:
            times.append(dt)
            act_peak, mem_peak = max(act_peak, meter.peak), max(mem_peak, mem.peak)
            mem_delta = max(mem_delta, mem.delta)
    var.zero_grad(set_to_none=True)
    var.set_grad_checkpointing(False)
    var.eval()
    return dict(kind='train', model=name, width=var.C, B=B, dtype=args.dtype, n0=n0, n1=n1, grad_ckpt=grad_ckpt,
                step_s=min(times),
                saved_act_mb=act_peak / 2 ** 20, peak_mem_mb=mem_peak / 2 ** 20, peak_mem_delta_mb=mem_delta / 2 ** 20)


# ============================================== reporting =============================================================
def machine_info(device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine())
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info['cpu_cores'] = os.cpu_count()
    if hasattr(os, 'getloadavg'):
        info['load_avg_1_5_15'] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def table(rows, cols) -> str:
    """``cols``: (header, key, format string or function of the value); None shows as '-'."""
    def cell(v, fmt):
        return '-' if v is None else fmt(v) if callable(fmt) else fmt.format(v)
    cells = [[h for h, _, _ in cols]] + [[cell(r.get(k), fmt) for _, k, fmt in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ['| ' + ' | '.join(c.rjust(w) for c, w in zip(row, widths)) + ' |' for row in cells]
    lines.insert(1, '|' + '|'.join('-' * (w + 1) + ':' for w in widths) + '|')
    return '\n'.join(lines)


SAMPLE_COLS = [('model', 'model', '{}'), ('width', 'width', '{}'), ('B', 'B', '{}'), ('dtype', 'dtype', '{}'),
               ('scales', 'infer_pn', '{}'), ('iters', 'schedule', '{}'), ('tol', 'iter_tol', '{:g}'),
               ('trace', 'trace', lambda v: 'on' if v else 'off'), ('iters run', 'iters_total', '{:.1f}'),
               ('img/s', 'img_s', '{:.3f}'), ('CPU s', 'cpu_s', '{:.3f}'), ('transformer s', 'transformer_s', '{:.3f}'),
               ('decoder s', 'decoder_s', '{:.3f}'), ('GFLOP', 'transformer_gflop', '{:.1f}'),
               ('GFLOP/s', 'transformer_gflop_s', '{:.1f}'), ('% of matmul', 'frac_pct', '{:.0f}%'),
               ('peak mem MB', 'peak_mem_mb', '{:.0f}'), ('KV cache MB', 'kv_cache_mb', '{:.1f}')]
TRAIN_COLS = [('model', 'model', '{}'), ('width', 'width', '{}'), ('B', 'B', '{}'), ('dtype', 'dtype', '{}'),
              ('n0 (no grad)', 'n0', '{}'), ('n1 (grad)', 'n1', '{}'),
              ('grad ckpt', 'grad_ckpt', lambda v: 'on' if v else 'off'), ('step s', 'step_s', '{:.3f}'),
              ('saved activations MB', 'saved_act_mb', '{:.1f}'), ('peak mem MB', 'peak_mem_mb', '{:.0f}'),
              ('peak - start MB', 'peak_mem_delta_mb', '{:.0f}')]


def checks(results) -> list:
    """The claims the benchmark is meant to show, each as (ok, sentence)."""
    out = []
    groups = defaultdict(list)
    for r in results:
        if r['kind'] == 'sample' and r['iters'] and r['iter_tol'] is None and not r['trace']:
            groups[(r['model'], r['width'], r['B'], r['dtype'], r.get('infer_pn'))].append(r)
    for key, rs in groups.items():
        # a schedule "lower" than another: no more iterations at any scale, fewer at some
        for hi in rs:
            for lo in rs:
                lower = all(a <= b for a, b in zip(lo['iters'], hi['iters'])) and lo['iters'] != hi['iters']
                if lo is not hi and lower:
                    ok = lo['img_s'] > hi['img_s'] and lo['kv_cache_mb'] < hi['kv_cache_mb']
                    pn = f' scales {key[4]}' if key[4] else ''
                    out.append((ok, f'{key[0]} B={key[2]} {key[3]}{pn}: {lo["schedule"]} vs {hi["schedule"]}: '
                                    f'{lo["img_s"] / hi["img_s"]:.2f}x images/s, '
                                    f'{lo["kv_cache_mb"] / hi["kv_cache_mb"]:.2f}x KV-cache bytes'))
    # FlexVAR: a schedule of scales that leaves some out of another (fewer steps, fewer tokens) samples faster with
    # fewer KV-cache bytes
    steps = defaultdict(list)
    for r in results:
        if r['kind'] == 'sample' and r.get('infer_pn') and r['iter_tol'] is None and not r['trace']:
            steps[(r['model'], r['width'], r['B'], r['dtype'], r['schedule'])].append(r)
    for key, rs in steps.items():
        for hi in rs:
            for lo in rs:
                a, b = set(lo['infer_pn'].split('_')), set(hi['infer_pn'].split('_'))
                if a < b:
                    ok = lo['img_s'] > hi['img_s'] and lo['kv_cache_mb'] < hi['kv_cache_mb']
                    it = f' iterations {key[4]}' if key[4] != '-' else ''
                    out.append((ok, f'{key[0]} B={key[2]} {key[3]}{it}: scales {lo["infer_pn"]} ({len(a)} steps) vs '
                                    f'{hi["infer_pn"]} ({len(b)}): {lo["img_s"] / hi["img_s"]:.2f}x images/s, '
                                    f'{lo["kv_cache_mb"] / hi["kv_cache_mb"]:.2f}x KV-cache bytes'))
    tr = [r for r in results if r['kind'] == 'train']
    by_n1 = defaultdict(dict)
    for r in tr:        # with and without activation checkpointing apart
        by_n1[(r['n1'], r.get('grad_ckpt', False))][r['n0']] = r
    for (n1, gc), d in by_n1.items():
        if 0 in d and len(d) > 1:
            worst = max(v['saved_act_mb'] for v in d.values()) / d[0]['saved_act_mb'] - 1
            tag = ', grad ckpt' if gc else ''
            out.append((worst <= 0.15, f'training, n1={n1}{tag}: saved activations vary by {100 * worst:+.1f}% over '
                                       f'n0 in {sorted(d)} (flat: within 15%)'))
    by_n0 = defaultdict(dict)
    for r in tr:
        by_n0[(r['n0'], r.get('grad_ckpt', False))][r['n1']] = r
    for (n0, gc), d in by_n0.items():
        n1s, tag = sorted(d), (', grad ckpt' if gc else '')
        if len(n1s) >= 3:
            a, b = d[n1s[0]]['saved_act_mb'], d[n1s[1]]['saved_act_mb']
            per = (b - a) / (n1s[1] - n1s[0])
            dev = max(abs(d[n]['saved_act_mb'] - (a + per * (n - n1s[0]))) for n in n1s) / max(per, 1e-9)
            out.append((per > 0 and dev <= 0.05 * max(n1s), f'training, n0={n0}{tag}: saved activations grow by '
                        f'{per:.2f} MB per gradient step (linear fit over n1 in {n1s}, max deviation '
                        f'{dev:.2f} steps)'))
    return out


def compute_control_notes(results) -> List[str]:
    """Each traced or early-exit VIAR run against the same schedule untraced and without ``iter_tol``: images/s
    ratio and iterations run (timings: read them with the machine's load in mind)."""
    base = {}
    for r in results:
        if r['kind'] == 'sample' and r['iters'] and r['iter_tol'] is None and not r['trace']:
            base[(r['model'], r['width'], r['B'], r['dtype'], r['schedule'], r.get('infer_pn'))] = r
    out = []
    for r in results:
        key = (r['model'], r['width'], r['B'], r['dtype'], r.get('schedule'), r.get('infer_pn'))
        b = base.get(key) if r['kind'] == 'sample' else None
        if b is None or r is b:
            continue
        what = ' + '.join(x for x in ((f'iter_tol {r["iter_tol"]:g}' if r['iter_tol'] is not None else ''),
                                      ('trace' if r['trace'] else '')) if x)
        pn = f' scales {r["infer_pn"]}' if r.get('infer_pn') else ''
        out.append(f'{r["model"]} B={r["B"]} {r["dtype"]}{pn} {r["schedule"]}, {what}: {r["img_s"] / b["img_s"]:.3f}x '
                   f'images/s of the plain run ({r["img_s"]:.3f} vs {b["img_s"]:.3f}), {r["cpu_s"] / b["cpu_s"]:.3f}x '
                   f'its CPU time, {r["iters_total"]:.1f} of {b["iters_total"]:.0f} iterations')
    return out


def plot(results, path):
    """A bar chart of images/s per (model, schedule, batch) drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw
    rows = [r for r in results if r['kind'] == 'sample']
    if not rows:
        raise BenchError('--plot needs sampling results (do not pass --models none)')
    W, H, pad, bar = 160 + 70 * len(rows), 420, 50, 40
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    top = max(r['img_s'] for r in rows)
    d.text((pad, 10), 'images/s (bar) and KV cache MB (label) per model / iterations / batch', fill='black')
    d.line((pad, H - 90, W - 10, H - 90), fill='black')
    for i, r in enumerate(rows):
        x = pad + 20 + 70 * i
        h = (H - 140) * r['img_s'] / top
        color = (200, 80, 60) if 'viar' in r['model'] else (60, 110, 200)
        d.rectangle((x, H - 90 - h, x + bar, H - 90), fill=color)
        d.text((x, H - 90 - h - 28), f'{r["img_s"]:.3g}', fill='black')
        d.text((x, H - 90 - h - 14), f'{r["kv_cache_mb"]:.3g}MB', fill='gray')
        d.text((x, H - 80), r['model'], fill='black')
        d.text((x, H - 66), r['schedule'] + (f' t{r["iter_tol"]:g}' if r.get('iter_tol') is not None else '')
               + (' tr' if r.get('trace') else ''), fill='black')
        d.text((x, H - 52), f'B={r["B"]}', fill='black')
        if r.get('infer_pn'):
            d.text((x, H - 38), f'{len(r["infer_pn"].split("_"))} steps', fill='black')
    import io

    from utils.misc import atomic_write_bytes
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    atomic_write_bytes(buf.getvalue(), path)


# ============================================== main ==================================================================
def parse_list(s, what, conv=int):
    if s.strip().lower() in ('', 'none'):
        return []
    try:
        return [conv(x) for x in s.split(',') if x.strip()]
    except ValueError as e:
        raise BenchError(f'could not read {what} {s!r}') from e


def parse_tols(s) -> List[Optional[float]]:
    """``--iter_tol``: comma-separated tolerances, ``none`` for the fixed schedule."""
    from utils.sampling_utils import parse_tolerance
    tols = []
    for x in (s or 'none').split(','):
        x = x.strip().lower()
        if x in ('none', ''):
            tols.append(None)
            continue
        tols.append(parse_tolerance(x, '--iter_tol', BenchError, f' {s!r}; write e.g. none,1e-3'))
    return list(dict.fromkeys(tols))


@dataclass
class Setup:
    """What the flags resolve to (defaults filled in for the device)."""
    device: torch.device
    dtype: torch.dtype
    width: int
    train_width: int
    vae_ch: int
    patch_nums: Tuple[int, ...]
    sample_models: List[str]
    train_models: List[str]
    schedules: List[Tuple[int, int]]
    iter_tols: List[Optional[float]]
    batch_sizes: List[int]
    grid: List[Tuple[int, int]]
    grad_ckpt: List[bool]                    # training rows without / with activation checkpointing
    infer_pns: List[Tuple[int, ...]]         # FlexVAR's schedules of scales


def amp(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The autocast dtype of the measured ``dtype`` (None: fp32, no autocast)."""
    return None if dtype == torch.float32 else dtype


def resolve_patch_nums(args) -> Tuple[int, ...]:
    from models import PATCH_NUMS_256, PATCH_NUMS_512
    if not args.patch_nums:
        return PATCH_NUMS_512 if args.reso == 512 else PATCH_NUMS_256
    return scales(args.patch_nums.replace(',', '_'), '--patch_nums')


def scales(text: str, flag: str, presets=None) -> Tuple[int, ...]:
    """Token-map sides like 1_2_3_4, strictly increasing from 1 (``utils.flags.parse_scales``)."""
    try:
        return parse_scales(text, presets, from_one=True)
    except ValueError as e:
        raise BenchError(f'{flag} must be increasing and start at 1 (sides like 1_2_4_8), got {text!r}') from e


def resolve_infer_pns(args, patch_nums) -> List[Tuple[int, ...]]:
    """``--infer_pn``: comma-separated FlexVAR schedules (default: the scales of ``--patch_nums`` / ``--reso``)."""
    texts = [t for t in (args.infer_pn or '').split(',') if t.strip()]
    return list(dict.fromkeys(scales(t, '--infer_pn', FLEX_SCHEDULE_PRESETS) for t in texts)) or [tuple(patch_nums)]


def resolve_setup(args) -> Setup:
    """Every flag checked and its device default filled in, before anything is built or measured."""
    device = dist.init_distributed(args.device)
    on_cpu = device.type == 'cpu'
    if args.dtype not in DTYPES:
        raise BenchError(f'--dtype must be one of {", ".join(DTYPES)}, got {args.dtype!r}')
    dtype = resolve_dtype(args.dtype, device) or torch.float32
    if on_cpu and dtype == torch.float16:
        raise BenchError('fp16 autocast is a CUDA path; use --dtype bf16 or fp32 on CPU')
    if args.reps < 1 or args.warmup < 0:
        raise BenchError(f'--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}')
    width = args.width if args.width >= 0 else (128 if on_cpu else 0)
    train_width = args.train_width if args.train_width >= 0 else width
    for w in (width, train_width):
        if w % 64:
            raise BenchError(f'--width must be a multiple of 64 (heads of 64 channels), got {w}')
    sample_models = parse_list(args.models, 'models', str)
    train_models = parse_list(args.train_models, 'training models', str)
    for m in sample_models + train_models:
        if m not in MODELS:
            raise BenchError(f'unknown model {m!r}; choose from {", ".join(MODELS)}')
    patch_nums = resolve_patch_nums(args)
    return Setup(
        device=device, dtype=dtype, width=width, train_width=train_width,
        vae_ch=args.vae_ch if args.vae_ch > 0 else (32 if on_cpu else 0), patch_nums=patch_nums,
        sample_models=sample_models, train_models=train_models,
        schedules=[parse_iterations(s, error=BenchError) for s in parse_list(args.schedules, 'schedules', str)]
        or [(10, 10)],
        iter_tols=parse_tols(args.iter_tol),
        batch_sizes=parse_list(args.batch_sizes, 'batch sizes') or ([2] if on_cpu else [16, 64]),
        grid=[parse_iterations(s, error=BenchError) for s in parse_list(args.train_grid, 'training grid', str)],
        grad_ckpt=parse_grad_ckpt(args.train_grad_ckpt),
        infer_pns=resolve_infer_pns(args, patch_nums))


def parse_grad_ckpt(text: str) -> List[bool]:
    """``--train_grad_ckpt``: off, on or off,on."""
    words = [w.strip() for w in text.split(',') if w.strip()]
    if not words or any(w not in ('off', 'on') for w in words):
        raise BenchError(f'--train_grad_ckpt takes off, on or off,on, got {text!r}')
    return list(dict.fromkeys(w == 'on' for w in words))


def measure_matmul(args, setup: Setup) -> Tuple[float, float]:
    """(fp32, --dtype) matmul FLOP/s of this machine now."""
    fp32 = matmul_flops_per_s(setup.device, torch.float32, args.matmul_n)
    return fp32, fp32 if setup.dtype == torch.float32 else matmul_flops_per_s(setup.device, setup.dtype, args.matmul_n)


def print_header(args, setup: Setup, info: dict, peak_fp32: float, peak_dtype: float) -> None:
    print(f'# machine: {info["cpu"]} ({info["cpu_cores"]} cores), torch {info["torch"]}, {info["threads"]} threads'
          + (f', GPU {info["gpu"]}' if 'gpu' in info else ''))
    print(f'# matmul {args.matmul_n}^3: fp32 {peak_fp32 / 1e9:.1f} GFLOP/s'
          + ('' if setup.dtype == torch.float32 else f', {args.dtype} {peak_dtype / 1e9:.1f} GFLOP/s'))
    if setup.device.type == 'cpu' and setup.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        print(f'# {SLOW_BF16_NOTE}')
    print(f'# dtype {args.dtype}, width {setup.width or "published"}, tokenizer ch {setup.vae_ch or "published"}, '
          f'{16 * setup.patch_nums[-1]} px, best of {args.reps} after {args.warmup} warm-up'
          + (', torch.compile' if args.compile else '')
          + ('' if setup.dtype == torch.float32 else
             ', weights in fp32 (plain autocast)' if args.no_cast else f', weights cast to {args.dtype} once'))


def build_for(name: str, width: int, args, setup: Setup, sampling: bool = False):
    """``sampling`` in half precision: the weights cast once (``VAR.cast_for_inference``) unless ``--no_cast``."""
    vae, var = build(name, width, setup.vae_ch, setup.device, setup.patch_nums)
    if sampling and setup.dtype != torch.float32 and not args.no_cast:
        var.cast_for_inference(setup.dtype)
    if args.compile:
        var.compile_blocks()
    return vae, var


def run_sampling(args, setup: Setup, peak_flops: float) -> List[dict]:
    results = []
    for name in setup.sample_models:
        vae, var = build_for(name, setup.width, args, setup, sampling=True)
        print(f'# {name}: {num_params(var) / 1e6:.1f} M parameters (width {var.C})', flush=True)
        # iter_tol and the trace are VIAR's: a VAR runs once per batch size
        variants = [(tol, trace) for tol in setup.iter_tols for trace in ((False, True) if args.trace else (False,))]
        flex = MODELS[name].get('flex', False)
        for B in setup.batch_sizes:
            for sch in (setup.schedules if var.use_implicit else [(0, 0)]):
                for pns in (setup.infer_pns if flex else [None]):     # FlexVAR: every schedule of scales
                    rows = bench_sampling(var, vae, name, B, sch, args, setup.device, setup.dtype, peak_flops,
                                          variants=variants if var.use_implicit else [(None, False)], infer_pn=pns)
                    results += rows
                    print('\n'.join(table(rows, SAMPLE_COLS).splitlines()[2:]), flush=True)
        del vae, var
        trim_host_memory()
    return results


def run_training(args, setup: Setup) -> List[dict]:
    results = []
    for name in setup.train_models:
        vae, var = build_for(name, setup.train_width, args, setup)
        for gc in setup.grad_ckpt:
            for n0, n1 in (setup.grid if var.use_implicit else [(0, 0)]):
                r = bench_training(var, vae, name, args.train_bs, n0, n1, args, setup.device, setup.dtype, gc)
                results.append(r)
                print(table([r], TRAIN_COLS).splitlines()[-1], flush=True)
        del vae, var
        trim_host_memory()
    return results


def remeasure_matmul(args, setup: Setup, results: List[dict], peak_fp32: float, peak_dtype: float):
    """The limit measured again after the runs; the best of both is kept (a shared machine may have been busy at
    the start) and the sampling rows' fraction of it recomputed.  Returns the (fp32, --dtype) limits kept."""
    again_fp32, again = measure_matmul(args, setup)
    if again > peak_dtype:
        for r in results:
            if r['kind'] == 'sample':
                r['frac_of_matmul'] = r['transformer_gflop_s'] * 1e9 / again
                r['frac_pct'] = 100 * r['frac_of_matmul']
    print(f'# matmul {args.matmul_n}^3 after the runs: fp32 {again_fp32 / 1e9:.1f} GFLOP/s'
          + ('' if setup.dtype == torch.float32 else f', {args.dtype} {again / 1e9:.1f} GFLOP/s')
          + f' (using the best: {max(peak_dtype, again) / 1e9:.1f})')
    return max(peak_fp32, again_fp32), max(peak_dtype, again)


def paper_ratios(samp: List[dict]) -> List[str]:
    """VIAR-d30 / VAR-d30 images/s and peak memory at each batch size, next to the paper's ratios."""
    var30 = {r['B']: r for r in samp if r['model'] == 'var_d30'}
    lines = []
    for r in samp:
        if r['model'] == 'viar_d30' and r['B'] in var30:
            v = var30[r['B']]
            lines.append(f'| {r["B"]} | {r["schedule"]} | {r["img_s"] / v["img_s"]:.2f}x '
                         f'(paper 2.12x) | {r["peak_mem_mb"] / v["peak_mem_mb"]:.2f}x (paper 0.44x) |')
    return lines


def print_report(args, setup: Setup, results: List[dict], found) -> None:
    samp = [r for r in results if r['kind'] == 'sample']
    train = [r for r in results if r['kind'] == 'train']
    if samp:
        print('\n## Sampling (transformer = backbone + head at every scale; % of the measured '
              f'{args.dtype} matmul FLOP/s)\n')
        print(table(samp, SAMPLE_COLS))
    if train:
        print('\n## Training step (forward + backward) against the fixed-point steps\n')
        print(table(train, TRAIN_COLS))
    lines = paper_ratios(samp) if setup.device.type != 'cpu' else []
    if lines:
        print('\n## VIAR-d30 / VAR-d30\n\n| B | iters | images/s | peak memory |\n|--:|--:|--:|--:|')
        print('\n'.join(lines))
    notes = compute_control_notes(results)
    if notes:
        print('\n## Fixed-point trace and early exit (against the same schedule without them)\n')
        print('\n'.join(f'- {n}' for n in notes))
    if found:
        print('\n## Checks\n')
        for ok, msg in found:
            print(f'- [{"ok" if ok else "NOT MET"}] {msg}')


def write_outputs(args, info: dict, peaks: Tuple[float, float], results: List[dict], found) -> None:
    from utils.misc import atomic_write_bytes
    if args.json:
        doc = dict(machine=info, matmul_gflop_s={'fp32': peaks[0] / 1e9, args.dtype: peaks[1] / 1e9},
                   args=vars(args), results=results, checks=[dict(ok=ok, what=m) for ok, m in found])
        atomic_write_bytes(json.dumps(doc, indent=1).encode(), args.json)
        print(f'\nwrote {args.json}')
    if args.plot:
        plot(results, args.plot)
        print(f'wrote {args.plot}')


def run(args) -> int:
    """Runs the benchmarks of ``args``; returns the exit status (1: ``--strict`` and a check not met)."""
    setup = resolve_setup(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    info = machine_info(setup.device)
    peak_fp32, peak_dtype = measure_matmul(args, setup)
    print_header(args, setup, info, peak_fp32, peak_dtype)
    results = run_sampling(args, setup, peak_dtype) + run_training(args, setup)
    peaks = remeasure_matmul(args, setup, results, peak_fp32, peak_dtype)
    found = checks(results)
    print_report(args, setup, results, found)
    write_outputs(args, info, peaks, results, found)
    return 1 if args.strict and not all(ok for ok, _ in found) else 0


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1 ...')
    p.add_argument('--dtype', default='fp32', help='fp32, bf16 (autocast; CPU and CUDA) or fp16 (autocast; CUDA)')
    p.add_argument('--models', default='var_d16,var_d30,viar_d30',
                   help=f'sampling benchmarks: {",".join(MODELS)} or none')
    p.add_argument('--schedules', default='10-10,10-5,5-5,10-1', help='VIAR iteration knobs iter_left-iter_right')
    p.add_argument('--iter_tol', default='none',
                   help='VIAR early exit: comma-separated tolerances, each benched with every schedule (its maximum '
                        'per scale); none = the fixed schedule; e.g. none,1e-2,1e-3')
    p.add_argument('--trace', action='store_true',
                   help='also bench every VIAR run with the fixed-point trace on (autoregressive_infer_cfg(trace=))')
    p.add_argument('--batch_sizes', default='', help='comma-separated (default: 2 on CPU, 16,64 on CUDA)')
    p.add_argument('--width', type=int, default=-1, help='transformer width; 0: published (64 x depth); '
                   'default: 128 on CPU, published on CUDA')
    p.add_argument('--vae_ch', type=int, default=0,
                   help='tokenizer width (default: 32 on CPU, the published one on CUDA: 160 VQVAE, 128 FlexVAE)')
    p.add_argument('--reso', type=int, default=256, choices=(256, 512))
    p.add_argument('--patch_nums', default='', help='scales, e.g. 1_2_3_4 (overrides --reso; for quick runs)')
    p.add_argument('--infer_pn', default='', help='FlexVAR models: comma-separated schedules of scales to sample, '
                   'e.g. 1_2_3_4_5_6_8_10_13_16,1_2_4_8_16 (default: the scales of --patch_nums / --reso)')
    p.add_argument('--train_models', default='viar_d30', help='training benchmarks (none to skip)')
    p.add_argument('--train_grid', default='0-2,5-2,10-2,0-1,0-4,0-8', help='n0-n1 pairs (steps without-with grad)')
    p.add_argument('--train_bs', type=int, default=2)
    p.add_argument('--train_grad_ckpt', default='off', help='training rows with activation checkpointing '
                   '(train.py --grad_ckpt): off, on or off,on')
    p.add_argument('--train_width', type=int, default=-1, help='width of the training benchmark (default: --width)')
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: torch default)')
    p.add_argument('--matmul_n', type=int, default=2048, help='size of the matmul that measures the FLOP/s limit')
    p.add_argument('--compile', action='store_true', help='torch.compile the blocks (VAR.compile_blocks)')
    p.add_argument('--no_cast', action='store_true',
                   help='half precision: leave the weights in fp32 (plain autocast casts them at every call) instead '
                        'of casting them once (VAR.cast_for_inference; the same images)')
    p.add_argument('--json', default='', help='also write the results here')
    p.add_argument('--plot', default='', help='also draw images/s and KV-cache MB into this PNG')
    p.add_argument('--strict', action='store_true', help='exit 1 when a check is not met')
    return p


def main(argv=None) -> int:
    """``python -m scripts.bench ARGV``: the exit status (``run``'s, or 1 after one error line)."""
    return run_cli(lambda: run(get_parser().parse_args(argv)), 'scripts.bench')


if __name__ == '__main__':
    raise SystemExit(main())
