"""Fixed-point diagnostics of a VIAR checkpoint: does the implicit block converge, how fast at each scale, and how
many iterations does sampling need before more stop changing the tokens?

    python -m scripts.fixed_point --classes 207 360 387 974 88 979 417 279 --per_class 4 --max_iters 30 \
        --out fixed_point     # the published VIAR and its tokenizer (the defaults of --var_ckpt, --vae_ckpt)
    python -m scripts.fixed_point --var_ckpt local_output/ar-ckpt-last.pth --vae_ckpt vae.pth \
        --classes 207 360 387 974 88 979 417 279 --per_class 4 --max_iters 30 --out fixed_point

Two measurements on the same images (as sampling.py seeds them): the relative residual of every CFG row at every
iteration of every scale with ``--max_iters`` iterations (median, 10-90 % band, contraction rate, the iteration each
tolerance is reached), and the fraction of tokens that change when sampling with n->n instead of ``--ref_iters``.
Both use ``--iter_solver`` and ``--warm_start``.  Writes ``<out>.json`` and ``<out>.png``; a VAR checkpoint is
refused; a bad flag or file ends with one line and exit status 1.  Details: docs/compute_control.md.
"""
import os

if __package__ in (None, ''):       # run as a file (python scripts/X.py): the repository's modules come first
    import _repo_path  # noqa: F401

import argparse
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from models.var import ITER_SOLVERS
from utils import dist
from utils.download import resolve_default
from utils.errors import UserError, run_cli
from utils.flags import BOOL
from utils.misc import atomic_write_bytes
from utils.plot import Panel, save_png
from utils.sampler_settings import SamplerSettings
from utils.sampling_utils import (
    add_device_args,
    add_guidance_args,
    check_args,
    dtype_name,
    load_measured,
    sample_batch,
    setup_device,
)
from utils.zoo import VAR_TOKENIZER, VIAR_MODEL, default_path

PROG = 'scripts.fixed_point'
QUANTILES = (0.1, 0.5, 0.9)
STOP_TOLS = (1e-1, 1e-2, 1e-3, 1e-4)


class FixedPointError(UserError):
    """A bad flag or checkpoint: one line, exit status 1."""


# ============================================== the images ============================================================
def image_units(classes: Sequence[int], per_class: int, batch_size: int) -> List[tuple]:
    """(class c, batch i, images in it) in order: ``per_class`` images of each class in batches of ``batch_size`` (the
    last one shorter), batch i sampled with ``g_seed = seed + i`` -- sampling.py's units."""
    return [(c, i, min(batch_size, per_class - lo)) for c in classes for i, lo in enumerate(range(0, per_class,
                                                                                                   batch_size))]


def sample_all(var, units, args, device, amp_dtype, n: int, trace: bool = False):
    """Tokens (N, L) of every image with the schedule n->n, and (trace) per scale the residuals (n, 2N): the
    conditional and the unconditional row of each image, batch by batch."""
    settings = SamplerSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, iter_left=n, iter_right=n,
                               iter_solver=args.iter_solver, anderson_m=args.anderson_m,
                               anderson_beta=args.anderson_beta, warm_start=args.warm_start)
    kw = dict(settings.kwargs(var), ret_idx_Bl=True)
    tokens, rows = [], [[] for _ in var.patch_nums]
    for c, i, b in units:
        tr = {} if trace else None
        label_B = torch.full((b,), c, dtype=torch.long, device=device)
        _, idx = sample_batch(var, label_B, args.seed + i, {**kw, 'trace': tr}, amp_dtype)
        tokens.append(torch.cat(idx, dim=1).cpu())
        if trace:
            for k, r in enumerate(tr['residual_rows']):
                rows[k].append(r.double())
    return torch.cat(tokens), ([torch.cat(r, dim=1) for r in rows] if trace else None)


# ============================================== statistics ============================================================
def residual_stats(rows_per_scale: List[torch.Tensor], patch_nums, ref_iters: int) -> List[Dict[str, Any]]:
    """Per scale: quantiles over rows of the residual at each iteration, the max, and the contraction rate."""
    out = []
    for k, (R, pn) in enumerate(zip(rows_per_scale, patch_nums)):
        q = torch.quantile(R, torch.tensor(QUANTILES, dtype=R.dtype), dim=1)       # (3, iterations)
        med = q[1].tolist()
        lo = min(max(ref_iters, 1), len(med)) - 1
        tail = [b / a for a, b in zip(med[lo:], med[lo + 1:]) if a > 0 and b > 0 and math.isfinite(a * b)]
        rate = math.exp(sum(map(math.log, tail)) / len(tail)) if tail else None
        out.append(dict(scale=k, pn=pn, p10=q[0].tolist(), median=med, p90=q[2].tolist(),
                        max=R.max(dim=1).values.tolist(), rate=rate,
                        nonfinite_rows=int((~torch.isfinite(R)).any(dim=0).sum())))
    return out


def stop_iterations(rows_per_scale: List[torch.Tensor]) -> Dict[str, List[Optional[int]]]:
    """For each tolerance of ``STOP_TOLS``: per scale the first iteration (1-based) at which every row is <= it."""
    out = {}
    for tol in STOP_TOLS:
        firsts = []
        for R in rows_per_scale:
            ok = (R <= tol).all(dim=1).nonzero()
            firsts.append(int(ok[0]) + 1 if len(ok) else None)
        out[f'{tol:g}'] = firsts
    return out


def token_change(tokens: torch.Tensor, ref: torch.Tensor, patch_nums) -> Dict[str, Any]:
    """Fraction of tokens different from ``ref`` (all, per scale) and fraction of images with any difference."""
    diff = tokens != ref
    per_scale, at = [], 0
    for pn in patch_nums:
        per_scale.append(diff[:, at:at + pn * pn].double().mean().item())
        at += pn * pn
    return dict(fraction=diff.double().mean().item(), per_scale=per_scale,
                images_changed=diff.any(dim=1).double().mean().item())


# ============================================== report ================================================================
def plot(doc: Dict[str, Any], path: str) -> None:
    res, tc = doc['residual']['per_scale'], doc['token_change']
    left = Panel(f'relative residual per scale (median, {int(100 * QUANTILES[0])}-{int(100 * QUANTILES[-1])} % of '
                 f'{doc["rows"]} rows)', 'iteration i', '||z_i - z_(i-1)|| / ||z_i||', logy=True,
                 legend='lower left')
    for s in res:
        its = list(range(1, len(s['median']) + 1))
        left.line(its, s['median'], label=f'scale {s["scale"] + 1} ({s["pn"]}x{s["pn"]})', band=(s['p10'], s['p90']),
                  marker=False)
    left.vline(doc['ref_iters'], f'{doc["ref_iters"]} (reference)')
    right = Panel(f'tokens different from the {doc["ref_iters"]}->{doc["ref_iters"]} result', 'iterations n '
                  '(schedule n->n)', 'fraction', ylim=(0.0, 1.0), legend='upper right')
    right.line(tc['n'], tc['fraction'], label='tokens (all scales)')
    right.line(tc['n'], tc['images_changed'], label='images with any change', dashed=True)
    right.line(tc['n'], [p[0] for p in tc['per_scale']], label='tokens of scale 1', marker=False)
    right.vline(doc['ref_iters'])
    save_png([left, right], path, title=f'{doc["model"]}: {os.path.basename(doc["var_ckpt"])}, {doc["images"]} images')


def summary(doc: Dict[str, Any]) -> str:
    m, r = doc['max_iters'], doc['ref_iters']
    at = lambda s, i: f'{s["median"][i - 1]:.2e}' if 1 <= i <= len(s['median']) else '-'
    lines = [f'| scale | median @1 | median @{r} | median @{m} | p90 @{m} | rate from {r} | all rows <= 1e-3 at |',
             '|--:|--:|--:|--:|--:|--:|--:|']
    for s, stop in zip(doc['residual']['per_scale'], doc['stop_iteration']['0.001']):
        rate = '-' if s['rate'] is None else f'{s["rate"]:.3f}'
        lines.append(f'| {s["scale"] + 1} ({s["pn"]}x{s["pn"]}) | {at(s, 1)} | {at(s, r)} | {at(s, m)} | '
                     f'{s["p90"][-1]:.2e} | {rate} | {stop or f"> {m}"} |')
    tc = doc['token_change']
    lines += ['', f'| n (n->n) | tokens != {r}->{r} | images changed |', '|--:|--:|--:|']
    lines += [f'| {n} | {100 * f:.1f} % | {100 * g:.0f} % |' for n, f, g in zip(tc['n'], tc['fraction'],
                                                                               tc['images_changed'])]
    return '\n'.join(lines)


# ============================================== main ==================================================================
def parse_iters(text: Optional[str], max_iters: int) -> List[int]:
    if not text:
        return list(range(1, max_iters + 1))
    try:
        ns = sorted({int(x) for x in text.replace(' ', ',').split(',') if x.strip()})
    except ValueError as e:
        raise FixedPointError(f'--token_iters {text!r}: write iteration counts, e.g. 1,2,3,5,10,20,30') from e
    if not ns or ns[0] < 0:
        raise FixedPointError(f'--token_iters {text!r}: iteration counts must be >= 0')
    return ns


def check_flags(args) -> None:
    check_args(args)        # cfg, top_k, top_p, seed, per_class, batch_size: the rules of the sampling scripts
    if args.max_iters < 1:
        raise FixedPointError(f'--max_iters {args.max_iters} must be >= 1')
    if args.ref_iters < 0:
        raise FixedPointError(f'--ref_iters {args.ref_iters} must be >= 0')
    if args.classes is not None and (not args.classes or min(args.classes) < 0):
        raise FixedPointError(f'--classes {args.classes} must be class indices >= 0')
    if os.path.isdir(args.out):
        raise FixedPointError(f'--out {args.out!r} is a folder; --out is a path prefix (writes OUT.json, OUT.png)')


def model_source(args) -> str:
    return args.pretrained or args.var_ckpt


def load_viar(args, device):
    """The VIAR model of ``--var_ckpt`` (or of the hub folder ``--pretrained``) and the classes to sample (checked
    against it)."""
    if not args.pretrained:
        args.var_ckpt, args.vae_ckpt = resolve_default(args.var_ckpt), resolve_default(args.vae_ckpt)   # from anywhere
    _, var = load_measured(model_source(args), bool(args.pretrained), args.vae_ckpt, args, device)
    if not var.use_implicit:
        raise FixedPointError(f'{model_source(args)!r} is {var.describe()}, which has no implicit block: the '
                              f'fixed-point diagnostics need a VIAR checkpoint')
    classes = args.classes
    if classes is None:     # spread over the classes: 0..7 for a small model, 8 distinct ones for ImageNet
        n = var.num_classes
        classes = sorted({round(j * (n - 1) / 7) for j in range(8)}) if n > 8 else list(range(n))
    if max(classes) >= var.num_classes:
        raise FixedPointError(f'--classes {max(classes)} is out of range: {model_source(args)!r} has classes '
                              f'0..{var.num_classes - 1}')
    return var, classes


def diagnose(var, classes, args, device, amp_dtype, token_iters: List[int]) -> Dict[str, Any]:
    """Both measurements (module doc) and the settings, as the JSON document."""
    units = image_units(classes, args.per_class, args.batch_size)
    N = sum(b for _, _, b in units)
    print(f'[fixed_point] {var.describe()} from {model_source(args)}: {N} images ({len(classes)} classes x '
          f'{args.per_class}), residuals over {args.max_iters} iterations ({args.iter_solver}'
          f'{", warm start" if args.warm_start else ""}), token change for n in '
          f'{token_iters[0]}..{token_iters[-1]} against {args.ref_iters}->{args.ref_iters}; '
          f'{dtype_name(amp_dtype)} on {device.type}', flush=True)
    t0 = time.time()
    tok_max, rows = sample_all(var, units, args, device, amp_dtype, args.max_iters, trace=True)
    tokens = {args.max_iters: tok_max}        # the trace leaves the tokens unchanged: this run counts as n = max
    for n in sorted(set(token_iters) | {args.ref_iters}):
        if n not in tokens:
            tokens[n] = sample_all(var, units, args, device, amp_dtype, n)[0]
    changes = [token_change(tokens[n], tokens[args.ref_iters], var.patch_nums) for n in token_iters]
    return dict(
        var_ckpt=model_source(args), vae_ckpt=None if args.pretrained else args.vae_ckpt, model=var.describe(),
        classes=classes,
        per_class=args.per_class, batch_size=args.batch_size, seed=args.seed, images=N, rows=2 * N, cfg=args.cfg,
        top_k=args.top_k, top_p=args.top_p, dtype=dtype_name(amp_dtype), device=device.type,
        iter_solver=args.iter_solver, anderson_m=args.anderson_m, anderson_beta=args.anderson_beta,
        warm_start=bool(args.warm_start),
        max_iters=args.max_iters, ref_iters=args.ref_iters, seconds=round(time.time() - t0, 2),
        residual=dict(rows='the conditional and the unconditional (CFG) row of every image', quantiles=QUANTILES,
                      per_scale=residual_stats(rows, var.patch_nums, args.ref_iters)),
        stop_iteration=stop_iterations(rows),
        token_change=dict(ref_iters=args.ref_iters, n=token_iters, fraction=[c['fraction'] for c in changes],
                          per_scale=[c['per_scale'] for c in changes],
                          images_changed=[c['images_changed'] for c in changes]))


def run(args) -> Dict[str, Any]:
    """The diagnostics of ``args`` (``get_parser``'s flags); writes OUT.json and OUT.png, returns the JSON's dict."""
    check_flags(args)
    token_iters = parse_iters(args.token_iters, args.max_iters)
    device, amp_dtype = setup_device(args)
    try:
        var, classes = load_viar(args, device)
        doc = diagnose(var, classes, args, device, amp_dtype, token_iters)
    finally:
        dist.destroy()
    try:
        atomic_write_bytes((json.dumps(doc, indent=1) + '\n').encode(), args.out + '.json')
        plot(doc, args.out + '.png')
    except OSError as e:
        raise FixedPointError(f'cannot write {args.out}.json / .png ({e}): pass another --out') from e
    print(summary(doc))
    print(f'[fixed_point] wrote {args.out}.json and {args.out}.png ({doc["seconds"]:.1f} s)')
    return doc


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m scripts.fixed_point', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--var_ckpt', default=default_path(VIAR_MODEL),
                   help='VIAR checkpoint (architecture read from the file)')
    p.add_argument('--vae_ckpt', default=default_path(VAR_TOKENIZER), help='its tokenizer')
    p.add_argument('--pretrained', default=None, metavar='DIR_OR_REPO',
                   help='a VIAR hub folder (models.save_pretrained) or Hugging Face repository holding one, instead of '
                        '--var_ckpt/--vae_ckpt')
    p.add_argument('--classes', type=int, nargs='+', default=None,
                   help='classes to sample (default: 8 spread over the model\'s classes, all of them if it has <= 8)')
    p.add_argument('--per_class', type=int, default=4, help='images per class')
    p.add_argument('--batch_size', type=int, default=4, help='images per sampler call (batch i: g_seed = seed + i)')
    p.add_argument('--seed', type=int, default=1, help='batch i of every class uses g_seed = seed + i')
    p.add_argument('--max_iters', type=int, default=30,
                   help='iterations at every scale for the residual curves (the paper samples with 10 and trains with '
                        'up to 10 + 12)')
    p.add_argument('--ref_iters', type=int, default=10, help='reference schedule of the token change: n->n with this n')
    p.add_argument('--token_iters', default='',
                   help='iteration counts n of the token-change curve, e.g. 1,2,3,5,10,20,30 (default: 1..max_iters)')
    add_guidance_args(p)
    p.add_argument('--iter_solver', choices=ITER_SOLVERS, default='picard',
                   help="fixed-point solver of both measurements: 'picard' (the paper's z <- f(z)) or 'anderson'")
    p.add_argument('--anderson_m', type=int, default=5, help='Anderson memory')
    p.add_argument('--anderson_beta', type=float, default=1.0, help='Anderson damping in (0, 1]')
    p.add_argument('--warm_start', default=False, help="each scale starts from the previous scale's fixed point",
                   **BOOL)
    p.add_argument('--out', default='fixed_point', help='output prefix: OUT.json and OUT.png')
    add_device_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status of ``python -m scripts.fixed_point ARGV``: 0, or 1 after one error line."""
    return run_cli(lambda: run(get_parser().parse_args(argv)), PROG)


if __name__ == '__main__':
    raise SystemExit(main())
