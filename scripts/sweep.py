"""The quality-compute sweep: FID (and sFID, IS, precision, recall) against images/s, peak memory and KV-cache bytes
for VAR checkpoints and for VIAR checkpoints under several iteration schedules and early-exit tolerances.

    python -m scripts.sweep --ckpts VAR.pth VIAR.pth \
        --schedules 10-10 10-5 5-5 10-1 3-3 --iter_tols 1e-2 1e-3 --num_classes 1000 --per_class 10 \
        --ref_batch data/VIRTUAL_imagenet256_labeled.npz --out sweep

For every operating point: samples (``utils.folder_sampling.sample_folder``, sampling.py's pipeline, resumable,
sharded under torchrun), measures (rank 0: images/s, peak memory, KV-cache bytes, iterations run) and scores
(``evaluator.evaluate`` against ``--ref_batch``).  Rerunning the same command reuses what is done.  Writes
``<out>/sweep.json``, ``<out>/sweep.md`` and ``<out>/pareto.png``; a bad flag or file ends with one line and exit
status 1.  Details: docs/compute_control.md ("The quality-compute sweep").
"""
import os

if __package__ in (None, ''):       # run as a file (python scripts/X.py): the repository's modules come first
    import _repo_path  # noqa: F401

import argparse
import hashlib
import json
import math
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from evaluator import evaluate, file_sha256, resolve_inception
from models.checkpoint import describe_var_config, infer_var_config, model_state_dict, read_checkpoint
from models.hub import WEIGHTS, read_hub_config, resolve_pretrained
from scripts.bench import Probe, machine_info, sync, trim_host_memory
from utils import dist
from utils.download import resolve_default
from utils.errors import UserError, run_cli
from utils.flags import parse_iterations
from utils.folder_sampling import (
    NPZ_KEY,
    checkpoint_identity,
    folder_name,
    hub_identity,
    read_config,
    sample_folder,
    units_of,
)
from utils.memory import PeakMemory
from utils.misc import atomic_write, atomic_write_bytes
from utils.model_io import model_errors
from utils.plot import Panel, save_png
from utils.sampler_settings import SamplerSettings
from utils.sampling_utils import (
    SEED_MAX,
    add_device_args,
    add_guidance_args,
    check_args,
    dtype_name,
    load_measured,
    parse_tolerance,
    pretrained_name,
    sample_batch,
    setup_device,
)
from utils.zoo import VAR_TOKENIZER, default_path

PROG = 'scripts.sweep'
SCORE_NAMES = {'FID': 'fid', 'sFID': 'sfid', 'Inception Score': 'inception_score', 'Precision': 'precision',
               'Recall': 'recall'}
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class SweepError(UserError):
    """A bad flag, checkpoint or reference batch: one line, exit status 1."""


# ============================================== operating points ======================================================
@dataclass
class Point:
    name: str                         # folder name under <out>/samples and <out>/points
    ckpt: str
    model: str                        # the curve it belongs to (one per checkpoint)
    implicit: bool
    depth: int
    num_classes: int
    iters: Optional[Tuple[int, int]]  # VIAR: (iter_left, iter_right); VAR: None
    iter_tol: Optional[float]
    hub: bool = False                 # ckpt is a hub folder or repository (--pretrained), not a .pth file
    iter_exit: str = 'batch'          # VIAR fixed-point knobs (see --variants)
    iter_solver: str = 'picard'
    warm_start: bool = False

    @property
    def label(self) -> str:
        if not self.implicit:
            return 'VAR'
        return f'{self.iters[0]}->{self.iters[1]}' + (f' tol {self.iter_tol:g}' if self.iter_tol is not None else '') \
            + ''.join(f' {v}' for v in self.variant_words)

    @property
    def short_label(self) -> str:
        """The point's text in the plot (its curve names the variant): the schedule, or ``t<tol>``."""
        if self.implicit and self.iter_tol is not None:
            return f't{self.iter_tol:g}'
        return self.label

    @property
    def variant_words(self) -> List[str]:
        return [w for w, on in (('row', self.iter_exit == 'row'), ('anderson', self.iter_solver == 'anderson'),
                                ('warm', self.warm_start)) if on]

    @property
    def family(self) -> str:
        """The curve of the Pareto plot: fixed schedules, or an early-exit variant."""
        if not self.implicit:
            return self.model
        if self.iter_tol is None:
            return f'{self.model}: fixed' + ''.join(f' {v}' for v in self.variant_words)
        exit_ = 'row exit' if self.iter_exit == 'row' else 'batch exit'
        return f'{self.model}: {exit_}' + ''.join(f' {v}' for v in self.variant_words if v != 'row')




def split_list(values: Sequence[str]) -> List[str]:
    """Flag values given space- or comma-separated (``10-10 5-5`` or ``10-10,5-5``)."""
    return [x for v in values for x in v.split(',') if x.strip()]


VARIANT_WORDS = ('batch', 'row', 'anderson', 'warm')


def parse_variant(text: str) -> Dict[str, Any]:
    """``--variants`` entry: '+'-joined words, e.g. ``row+anderson+warm`` -> the fixed-point keywords of a point."""
    words = [w.strip() for w in text.split('+') if w.strip()]
    bad = [w for w in words if w not in VARIANT_WORDS]
    if bad or not words or ('batch' in words and 'row' in words):
        raise SweepError(f'could not read the variant {text!r}: join {", ".join(VARIANT_WORDS)} with +, e.g. '
                         f'row+anderson (batch and row exclude each other)')
    return dict(iter_exit='row' if 'row' in words else 'batch',
                iter_solver='anderson' if 'anderson' in words else 'picard', warm_start='warm' in words)


def parse_tols(values: Sequence[str]) -> List[float]:
    return [parse_tolerance(x, '--iter_tols', SweepError, ': write e.g. 1e-2 1e-3') for x in split_list(values)]


def ckpt_label(path: str) -> str:
    """``<folder>-<file stem>``: tells apart the ``ar-ckpt-last.pth`` of two training runs."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r'[^A-Za-z0-9._-]+', '_', f'{parent}-{stem}' if parent else stem)


def inspect_ckpt(path: str, hub: bool = False) -> Dict[str, Any]:
    """The architecture stored in a checkpoint (read memory-mapped; nothing is built) or a hub folder's config."""
    with model_errors():
        if hub:
            return read_hub_config(path)['transformer']
        return infer_var_config(model_state_dict(read_checkpoint(path, 'model checkpoint'), path), path)


def plan_points(args) -> List[Point]:
    """Every operating point of the flags, in order: each checkpoint's points together."""
    schedules = [parse_iterations(s, '--schedules', SweepError) for s in split_list(args.schedules)]
    tol_sched = parse_iterations(args.tol_schedule, '--tol_schedule', SweepError)
    points, labels = [], {}
    sources = [(c, False) for c in dict.fromkeys(args.ckpts)] + [(h, True) for h in dict.fromkeys(args.pretrained)]
    for ckpt, hub in sources:
        cfg = inspect_ckpt(ckpt, hub)
        if cfg.get('flex'):
            raise SweepError(f'{ckpt!r} holds {describe_var_config(cfg)}: the sweep takes VAR and VIAR checkpoints '
                             f'(FlexVAR scale schedules are not operating points here)')
        label = re.sub(r'[^A-Za-z0-9._-]+', '_', pretrained_name(ckpt)) if hub else ckpt_label(ckpt)
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f'{label}-{labels[label]}'
        common = dict(ckpt=ckpt, model=f'{"VIAR" if cfg["use_implicit"] else "VAR"}-d{cfg["depth"]} {label}',
                      implicit=cfg['use_implicit'], depth=cfg['depth'], num_classes=cfg['num_classes'], hub=hub)
        if not cfg['use_implicit']:
            points.append(Point(name=label, iters=None, iter_tol=None, **common))
            continue
        for il, ir in dict.fromkeys(schedules):
            points.append(Point(name=f'{label}-it{il}-{ir}', iters=(il, ir), iter_tol=None, **common))
        for tol in dict.fromkeys(parse_tols(args.iter_tols)):
            for variant in dict.fromkeys(split_list(args.variants)):
                p = Point(name='', iters=tol_sched, iter_tol=tol, **parse_variant(variant), **common)
                p.name = f'{label}-it{tol_sched[0]}-{tol_sched[1]}-tol{tol:g}' + ''.join(f'-{w}' for w in
                                                                                      p.variant_words)
                if all(q.name != p.name for q in points):
                    points.append(p)
    if not points:
        raise SweepError('no operating point: pass VIAR checkpoints (--ckpts or --pretrained) with --schedules or '
                         '--iter_tols, or VAR ones')
    return points


# ============================================== 1. sampling (sampling.py's pipeline) ==================================
@dataclass
class Run:
    """What point ``p`` samples: sampling.py's images with these settings, into ``folder`` (+ ``.npz``)."""
    folder: str
    settings: SamplerSettings
    num_classes: int
    per_class: int
    batch_size: int
    seed: int


def point_run(args, p: Point, num_classes: int, seed: int) -> Run:
    """The images of point ``p`` and seed set ``seed``: sampling.py's folder under ``<out>/samples/<point>``."""
    il, ir = p.iters or (10, 10)        # a VAR ignores them (and they are not recorded for it)
    anderson = p.iter_solver == 'anderson'
    settings = SamplerSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=False, iter_left=il,
                               iter_right=ir, iter_tol=p.iter_tol, iter_exit=p.iter_exit, iter_solver=p.iter_solver,
                               anderson_m=args.anderson_m if anderson else None,
                               anderson_beta=args.anderson_beta if anderson else None, warm_start=p.warm_start)
    name = pretrained_name(p.ckpt) if p.hub else os.path.basename(p.ckpt)
    folder = os.path.join(args.out, 'samples', p.name, folder_name(name, p.depth, p.implicit, seed,
                                                                   settings.kwargs()))
    return Run(folder=folder, settings=settings, num_classes=num_classes, per_class=args.per_class,
               batch_size=args.batch_size, seed=seed)


def load_point(p: Point, args, device):
    """(tokenizer, transformer) of the point's checkpoint (with ``--vae_ckpt``) or hub folder; under fp16/bf16 the
    transformer's weights cast once (``--cast_weights``)."""
    return load_measured(p.ckpt, p.hub, args.vae_ckpt, args, device)


def sample_point(p: Point, run: Run, models, args, amp_dtype) -> None:
    """Samples (or completes) the point's folder and npz with ``sample_folder``."""
    vae, var = models
    names, weights = (None, None)
    if dist.is_master():
        names, weights = (hub_identity(p.ckpt, os.path.join(resolve_pretrained(p.ckpt), WEIGHTS)) if p.hub
                          else checkpoint_identity(p.ckpt, args.vae_ckpt))
    try:
        sample_folder(vae, var, run.folder, run.num_classes, run.per_class, run.seed, batch_size=run.batch_size,
                      amp_dtype=amp_dtype, names=names, weights=weights, settings=run.settings)
    except OSError as e:
        raise SweepError(f'{e}; every image written so far is kept: fix this and rerun the same command to resume',
                         every_rank=True) from e


# ============================================== 2. measuring ==========================================================
def measure_point(var, vae, run: Run, args, device, amp_dtype) -> Dict[str, Any]:
    """images/s, peak memory, peak KV-cache bytes and iterations run over ``--time_batches`` sampler calls."""
    units = units_of(run.num_classes, run.per_class, run.batch_size)
    calls = [units[j % len(units)] for j in range(args.time_warmup + args.time_batches)]
    kw = run.settings.kwargs(var)

    def call(c, i, idx):
        label_B = torch.full((len(idx),), c, dtype=torch.long, device=device)
        return sample_batch(var, label_B, run.seed + i, kw, amp_dtype)

    for unit in calls[:args.time_warmup]:
        call(*unit)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None
    probe = Probe(var, vae, device)
    try:
        trim_host_memory()
        images, iters = 0, []
        with PeakMemory(device) as mem:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for unit in calls[args.time_warmup:]:
                probe.iters_run = []
                call(*unit)
                images += len(unit[2])
                iters.append(probe.iters_run)
            sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        probe.collect()
    finally:
        probe.remove()
    per_scale = [sum(col) / len(iters) for col in zip(*iters)] if var.use_implicit else None
    return dict(images_s=images / wall, seconds=wall, images_cpu_s=images / max(cpu, 1e-9), cpu_seconds=cpu,
                images_timed=images, peak_mem_mb=mem.peak / 2 ** 20,
                peak_mem_delta_mb=mem.delta / 2 ** 20, kv_cache_mb=probe.kv_peak / 2 ** 20,
                iters_run=per_scale, iters_total=sum(per_scale) if per_scale else None, load_avg_1_5_15=load,
                timed_at=time.strftime('%Y-%m-%d %H:%M:%S'))


def measure_key(run: Run, args, device, amp_dtype) -> Dict[str, Any]:
    """What a measurement depends on: the recorded sampling settings and weights, and how it was timed."""
    config = {k: v for k, v in (read_config(run.folder) or {}).items() if k != NPZ_KEY}
    return dict(sampling=config, device=str(device), dtype=dtype_name(amp_dtype), batch_size=run.batch_size,
                time_batches=args.time_batches, time_warmup=args.time_warmup, threads=torch.get_num_threads())


# ============================================== 3. scoring ============================================================
def reference_npz(args) -> Optional[str]:
    """``--ref_batch`` as an npz: a folder of images is packed (sorted paths, all of one size) into
    ``<out>/ref_batch.npz``, again only when the folder's files (names, sizes, times) changed."""
    ref = args.ref_batch
    if not ref or not os.path.isdir(ref):
        return ref
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(ref) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if len(paths) < 4:
        raise SweepError(f'--ref_batch {ref!r} holds {len(paths)} images; precision/recall need at least 4')
    listing = '\n'.join(f'{os.path.relpath(p, ref)}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}' for p in paths)
    source = hashlib.sha256(listing.encode()).hexdigest()
    out = os.path.join(args.out, 'ref_batch.npz')
    if os.path.isfile(out):
        try:
            with np.load(out) as z:
                if str(z['source_files']) == source:
                    return out
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    from PIL import Image
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert('RGB')))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise SweepError(f'--ref_batch {ref!r}: the images differ in size ({sorted(sizes)[:3]}); resize them first')
    atomic_write(lambda f: np.savez(f, arr_0=np.stack(arrays), source_files=np.array(source)), out)
    print(f'[sweep] packed {len(paths)} reference images of {ref} into {out}', flush=True)
    return out


def score_key(npz: str, ref: str, args) -> Dict[str, Any]:
    from utils.misc import npz_member_crc32
    st = os.stat(ref)
    return dict(npz_crc32=npz_member_crc32(npz), ref=os.path.abspath(ref), ref_bytes=st.st_size,
                ref_mtime_ns=st.st_mtime_ns, inception_sha256=file_sha256(resolve_inception(args.inception)))


def score_point(npz: str, ref: str, args) -> Dict[str, float]:
    scores = evaluate(ref, npz, inception=args.inception, batch_size=args.eval_batch_size, save_ref_stats=True)
    return {SCORE_NAMES[k]: float(v) for k, v in scores.items()}


# ============================================== the records and the report ============================================
def record_path(args, p: Point, seed: int) -> str:
    return os.path.join(args.out, 'points', f'{p.name}-seed-{seed}.json')


def read_record(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(obj, path: str) -> None:
    atomic_write_bytes((json.dumps(obj, indent=1) + '\n').encode(), path)


def table_md(rows: List[Dict[str, Any]]) -> str:
    """The table; a measure or score of several seed sets is written ``mean ± sd``."""
    def f(r, key, fmt):
        v = r.get(key)
        if v is None:
            return '-'
        sd = r.get(f'{key}_sd')
        return fmt.format(v) + (f' ± {fmt.format(sd)}' if len(r.get(f'{key}_all') or ()) > 1 else '')
    head = ('| point | model | iterations | iter_tol | variant | iterations run | images/s | images/s (CPU time) | '
            'peak mem MB | KV cache MB | FID | sFID | IS | precision | recall |')
    lines = [head, '|' + '---|' * 5 + '--:|' * 10]
    for r in rows:
        variant = ' '.join(w for w, on in (('row', r['iter_exit'] == 'row'), ('anderson', r['iter_solver'] ==
                                                                               'anderson'), ('warm', r['warm_start']))
                           if on) or '-'
        tol = '-' if r['iter_tol'] is None else format(r['iter_tol'], 'g')
        lines.append(f'| {r["point"]} | {r["model"]} | {r["iters"] or "-"} | {tol} | {variant if r["iters"] else "-"} '
                     f'| {f(r, "iters_total", "{:.1f}")} | {f(r, "images_s", "{:.3f}")} | '
                     f'{f(r, "images_cpu_s", "{:.3f}")} | '
                     f'{f(r, "peak_mem_mb", "{:.0f}")} | {f(r, "kv_cache_mb", "{:.2f}")} | {f(r, "fid", "{:.2f}")} | '
                     f'{f(r, "sfid", "{:.2f}")} | {f(r, "inception_score", "{:.2f}")} | '
                     f'{f(r, "precision", "{:.3f}")} | {f(r, "recall", "{:.3f}")} |')
    return '\n'.join(lines)


def pareto_plot(rows: List[Dict[str, Any]], path: str, title: str, speed_key: str = 'images_s') -> None:
    """FID against images/s and against KV-cache MB, a curve per checkpoint and kind of point (``Point.family``:
    fixed schedules, batch exit, row exit ...; points in order of images/s), error bars of one standard deviation
    over the seed sets."""
    clock = 'CPU-time ' if speed_key == 'images_cpu_s' else ''
    speed = Panel(f'FID vs {clock}images/s (lower right is better)', f'{clock}images/s', 'FID', legend='upper left')
    kv = Panel('FID vs KV-cache MB (lower left is better)', 'KV-cache MB (peak)', 'FID', legend='upper right')
    for family in dict.fromkeys(r['family'] for r in rows):
        rs = sorted((r for r in rows if r['family'] == family and r.get('fid') is not None),
                    key=lambda r: r[speed_key])
        if rs:
            yerr = [r.get('fid_sd') or 0.0 for r in rs]
            speed.line([r[speed_key] for r in rs], [r['fid'] for r in rs], label=family,
                       texts=[r['short_label'] for r in rs], xerr=[r.get(f'{speed_key}_sd') or 0.0 for r in rs],
                       yerr=yerr)
            rs = sorted(rs, key=lambda r: r['kv_cache_mb'])
            fixed = all(r['iter_tol'] is None for r in rs)  # early-exit points share their maximum's KV cache
            kv.line([r['kv_cache_mb'] for r in rs], [r['fid'] for r in rs], label=family,
                    texts=[r['short_label'] for r in rs] if fixed else None, yerr=[r.get('fid_sd') or 0.0 for r in rs])
    fixed = [r for r in rows if r['kind'] == 'VIAR' and r['iter_tol'] is None and r.get('fid') is not None]
    if fixed and len(fixed) < len(rows):    # the bar an adaptive point must pass: 1.2x the best fixed schedule
        best = min(fixed, key=lambda r: r['fid'])
        speed.vline(1.2 * best[speed_key], f'1.2x {best["short_label"]}')
    save_png([speed, kv], path, title=title)


# ============================================== main ==================================================================
def check_flags(args) -> None:
    bad = [f'--{k} {getattr(args, k)} must be >= {lo}' for k, lo in (('per_class', 1), ('batch_size', 1),
           ('time_batches', 1), ('time_warmup', 0), ('eval_batch_size', 1)) if getattr(args, k) < lo]
    parse_tols(args.iter_tols)
    if args.num_classes is not None and args.num_classes < 1:
        bad.append(f'--num_classes {args.num_classes} must be >= 1')
    if args.ref_batch and not os.path.exists(args.ref_batch):
        bad.append(f'--ref_batch {args.ref_batch!r} not found')
    if not args.ckpts and not args.pretrained:
        bad.append('no model: pass --ckpts and/or --pretrained')
    if args.anderson_m < 1:
        bad.append(f'--anderson_m {args.anderson_m} must be >= 1')
    if not 0 < args.anderson_beta <= 1:
        bad.append(f'--anderson_beta {args.anderson_beta} must be in (0, 1]')
    for v in split_list(args.variants):
        parse_variant(v)
    n_batches = -(-args.per_class // args.batch_size)     # seed set s uses g_seed s .. s + n_batches - 1
    seeds = sorted(args.seed)
    close = [(a, b) for a, b in zip(seeds, seeds[1:]) if b - a < n_batches]
    if close:
        bad.append(f'--seed {close[0][0]} {close[0][1]} overlap: a seed set uses g_seed = seed + i for the '
                   f'{n_batches} batches i of a class; pass seeds at least {n_batches} apart')
    if bad:
        raise SweepError('; '.join(bad))
    try:
        check_args(args)        # --cfg / --top_k / --top_p / --seed: the sampling scripts' rules
    except UserError as e:
        raise SweepError(str(e)) from e
    last_g_seed = max(args.seed) + math.ceil(args.per_class / args.batch_size) - 1
    if last_g_seed > SEED_MAX:
        raise SweepError(f'--seed {max(args.seed)} is too large: the last batch of a class would use g_seed '
                         f'{last_g_seed} > 2**64 - 1')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SweepError(f'--out {args.out!r} is a file, not a folder: pass another --out')


def plan(args) -> Tuple[List[Point], List[List[Run]]]:
    """The operating points and the images of each (one run per seed set), every flag checked (nothing loaded or
    written)."""
    check_flags(args)
    points = plan_points(args)
    num_classes = args.num_classes or min(p.num_classes for p in points)
    too_few = [p for p in points if p.num_classes < num_classes]
    if too_few:
        raise SweepError(f'--num_classes {num_classes} but {too_few[0].ckpt!r} has {too_few[0].num_classes} classes')
    return points, [[point_run(args, p, num_classes, seed) for seed in args.seed] for p in points]


def run(args) -> List[Dict[str, Any]]:
    """The sweep of ``args``; returns the table's rows (rank 0; the other ranks return [] once sampling is done)."""
    args.vae_ckpt = resolve_default(args.vae_ckpt)      # ckpts/<published file>: the repository's, from anywhere
    points, runs = plan(args)
    device, amp_dtype = setup_device(args)
    master = dist.is_master()
    try:
        models = (None, None)
        for i, (p, per_seed) in enumerate(zip(points, runs)):
            if models[0] != p.ckpt:
                models = (None, None)
                models = (p.ckpt, load_point(p, args, device))
            for r in per_seed:
                if master:
                    print(f'\n[sweep] point {i + 1}/{len(points)}: {p.name} ({p.model}, {p.label}), seed {r.seed}',
                          flush=True)
                sample_point(p, r, models[1], args, amp_dtype)
        models = None
        dist.barrier()
    finally:
        dist.destroy()
    if not master:      # measuring and scoring are rank 0's: the other ranks are done
        return []
    records = measure_all(points, runs, args, device, amp_dtype)
    ref = reference_npz(args)
    if ref:
        score_all(points, runs, records, ref, args)
    rows = [point_row(p, per_seed, [records[(p.name, r.seed)] for r in per_seed], ref)
            for p, per_seed in zip(points, runs)]
    write_report(rows, args, device, amp_dtype, ref)
    return rows


MEASURES = ('images_s', 'seconds', 'images_cpu_s', 'cpu_seconds', 'peak_mem_mb', 'peak_mem_delta_mb', 'kv_cache_mb',
            'iters_total')


def point_row(p: Point, per_seed: List[Run], recs, ref) -> Dict[str, Any]:
    """A point's row: its settings, and of every measure and score the mean over the seed sets (``<name>``), the
    sample standard deviation (``<name>_sd``; 0 for one set) and the values (``<name>_all``, in seed order)."""
    r0 = per_seed[0]
    row = dict(point=p.name, model=p.model, label=p.label, short_label=p.short_label, family=p.family, ckpt=p.ckpt,
               kind='VIAR' if p.implicit else 'VAR', iters=f'{p.iters[0]}->{p.iters[1]}' if p.iters else None,
               iter_tol=p.iter_tol, iter_exit=p.iter_exit, iter_solver=p.iter_solver, warm_start=p.warm_start,
               seeds=[r.seed for r in per_seed], images=r0.num_classes * r0.per_class, npz=r0.folder + '.npz',
               npz_all=[r.folder + '.npz' for r in per_seed])
    first = recs[0]['measure']
    row.update({k: v for k, v in first.items() if k not in MEASURES})     # iters_run, load, time: the first set's
    values = {k: [r['measure'].get(k) for r in recs] for k in MEASURES}
    if ref:
        values.update({k: [r['scores'][k] for r in recs] for k in SCORE_NAMES.values()})
    for k, vs in values.items():
        if any(v is None for v in vs):
            row[k] = None
            continue
        mean = sum(vs) / len(vs)
        row.update({k: mean, f'{k}_sd': (sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) ** 0.5 if len(vs) > 1
                    else 0.0, f'{k}_all': vs})
    return row


def score_all(points, runs, records, ref: str, args) -> None:
    """Adds the scores to every record that has none for this npz, reference batch and Inception graph."""
    for p, per_seed in zip(points, runs):
        for r in per_seed:
            rec, npz = records[(p.name, r.seed)], r.folder + '.npz'
            key = score_key(npz, ref, args)
            if rec.get('score_key') != key or 'scores' not in rec:
                print(f'[sweep] scoring {p.name}, seed {r.seed}', flush=True)
                rec.update(scores=score_point(npz, ref, args), score_key=key)
                write_json(rec, record_path(args, p, r.seed))


def measure_all(points, runs, args, device, amp_dtype) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The record of every (point, seed set), measured where no valid measurement is stored.  The points take turns
    within each seed set (a change of the machine's load falls on all of them alike); a checkpoint is loaded when
    the next point needs another one."""
    records, loaded = {}, (None, None, None)
    for j in range(len(args.seed)):
        for p, per_seed in zip(points, runs):
            r = per_seed[j]
            rec = read_record(record_path(args, p, r.seed))
            key = measure_key(r, args, device, amp_dtype)
            if args.remeasure or rec.get('measure_key') != key or 'measure' not in rec:
                if loaded[0] != p.ckpt:
                    loaded = (None, None, None)
                    trim_host_memory()
                    loaded = (p.ckpt, *load_point(p, args, device))
                print(f'[sweep] timing {p.name}, seed {r.seed}: {args.time_batches} calls of {r.batch_size} images',
                      flush=True)
                rec = dict(point=asdict(p), seed=r.seed,
                           measure=measure_point(loaded[2], loaded[1], r, args, device, amp_dtype), measure_key=key)
                write_json(rec, record_path(args, p, r.seed))
            records[(p.name, r.seed)] = rec
    return records


def write_report(rows, args, device, amp_dtype, ref) -> None:
    info = machine_info(device)
    loads = [r['load_avg_1_5_15'][0] for r in rows if r.get('load_avg_1_5_15')]
    doc = dict(machine=info, dtype=dtype_name(amp_dtype), ref_batch=ref, inception=args.inception,
               args=vars(args), points=rows)
    write_json(doc, os.path.join(args.out, 'sweep.json'))
    md = table_md(rows)
    load = f'{min(loads):.2f} to {max(loads):.2f}' if loads else 'unknown'
    sets = len(args.seed)
    note = (f'\n\n{info["cpu"]}' + (f', GPU {info["gpu"]}' if 'gpu' in info else '')
            + f', {info["threads"]} thread(s), {dtype_name(amp_dtype)}; 1-minute load average when the points were '
            f'timed: {load} ({info.get("cpu_cores")} cores); {args.time_batches} calls of {args.batch_size} images '
            f'timed per point and seed set; {rows[0]["images"]} images scored per point and seed set'
            + (f'; mean ± standard deviation over {sets} seed sets ({", ".join(map(str, args.seed))})' if sets > 1
               else '') + '.\n')
    atomic_write_bytes((md + note).encode(), os.path.join(args.out, 'sweep.md'))
    print('\n' + md + note)
    if ref and any(r.get('fid') is not None for r in rows):
        pareto_plot(rows, os.path.join(args.out, 'pareto.png'), title=f'{rows[0]["images"]} images per point'
                    + (f' and seed set, mean ± sd over {sets} sets' if sets > 1 else '')
                    + f', {dtype_name(amp_dtype)} on {device.type}',
                    speed_key='images_cpu_s' if args.speed_clock == 'cpu' else 'images_s')
        print(f'[sweep] wrote {args.out}/sweep.json, sweep.md and pareto.png')
    else:
        print(f'[sweep] wrote {args.out}/sweep.json and sweep.md (no --ref_batch: not scored, no Pareto plot)')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m scripts.sweep', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('operating points')
    g.add_argument('--ckpts', nargs='+', default=[], help='VAR and VIAR checkpoints (kind read from each file)')
    g.add_argument('--pretrained', nargs='+', default=[], metavar='DIR_OR_REPO',
                   help='VAR and VIAR hub folders (models.save_pretrained) or Hugging Face repositories holding one; '
                        'their own tokenizer is used, not --vae_ckpt')
    g.add_argument('--vae_ckpt', default=default_path(VAR_TOKENIZER), help='their tokenizer')
    g.add_argument('--schedules', nargs='*', default=['10-10', '10-5', '5-5', '10-1', '3-3'],
                   help='VIAR iteration schedules ITER_LEFT-ITER_RIGHT, one point each')
    g.add_argument('--iter_tols', nargs='*', default=[],
                   help='VIAR early-exit tolerances, one point each (relative residual; e.g. 1e-2 1e-3)')
    g.add_argument('--tol_schedule', default='10-10',
                   help='the schedule (each scale\'s maximum) of the tolerance points')
    g.add_argument('--variants', nargs='*', default=['batch'],
                   help="each tolerance point once per variant: '+'-joined words of batch (exit when every row of "
                        "the batch converged) or row (each image on its own), anderson (Anderson solver), warm "
                        "(warm start), e.g. batch row row+anderson row+warm")
    g.add_argument('--anderson_m', type=int, default=5, help='Anderson memory of the anderson variants')
    g.add_argument('--anderson_beta', type=float, default=1.0, help='Anderson damping of the anderson variants')

    g = p.add_argument_group('images (sampling.py\'s flags and defaults)')
    g.add_argument('--num_classes', type=int, default=None,
                   help='classes 0..num_classes-1 (default: all classes of the checkpoints)')
    g.add_argument('--per_class', type=int, default=50, help='images per class')
    g.add_argument('--batch_size', type=int, default=25, help='images per sampler call (also for the timing)')
    g.add_argument('--seed', type=int, nargs='+', default=[1],
                   help='batch i of every class uses g_seed = seed + i; several seeds: every point is sampled, timed '
                        'and scored once per seed set (disjoint sets), and the report gives mean and spread')
    add_guidance_args(g)
    g = p.add_argument_group('measuring and scoring')
    g.add_argument('--time_batches', type=int, default=3, help='timed sampler calls per point')
    g.add_argument('--time_warmup', type=int, default=1, help='untimed sampler calls before them')
    g.add_argument('--remeasure', action='store_true', help='time every point again, even if a measurement is stored')
    g.add_argument('--speed_clock', choices=('wall', 'cpu'), default='wall',
                   help="images/s of the Pareto plot: per wall-clock second, or per second of the process's CPU time "
                        '(on a shared CPU it moves much less with the other processes\' load; one thread)')

    g.add_argument('--ref_batch', default=None,
                   help='reference batch: an npz for evaluator.py, or a folder of images (one size) packed once into '
                        'OUT/ref_batch.npz; without it nothing is scored')
    g.add_argument('--inception', default=None, help='Inception graph for evaluator.py (default: its cache/download)')
    g.add_argument('--eval_batch_size', type=int, default=64, help='images per Inception forward pass')
    p.add_argument('--out', default='sweep', help='output folder')
    add_device_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status of ``python -m scripts.sweep ARGV``: 0, or 1 after one error line (130: Ctrl-C)."""
    return run_cli(lambda: run(get_parser().parse_args(argv)), PROG,
                   interrupted='interrupted; every image and measurement written so far is kept: rerun the same '
                               'command to resume')


if __name__ == '__main__':
    raise SystemExit(main())
