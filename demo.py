"""The whole VIAR pipeline on a laptop CPU, no download: shapes you can see, and VIAR's iteration knob.

    python demo.py                      # or: bash scripts/demo.sh (installs requirements.txt first if an import fails)
    python demo.py --out my_demo --var_ep 40 --iters 10-10 3-3 1-1

Stages, each running the repository's own script as a user would (rerunning skips what is finished and resumes an
interrupted training): data (``utils/demo_data.py``: 8 classes of 32 px pictures), tokenizer (``train_vae.py``), VIAR
(``train.py --use_implicit``), samples (``gen_img.py`` per schedule of ``--iters``), speed (images/s, distance to the
fixed point) and score (a small CNN, ``models/demo_classifier.py``, in place of FID).  Everything goes to ``<out>/``:
``report.json``, the grids, ``demo_log.txt`` and the TensorBoard logs.  Details: docs/demo.md.
"""
import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.abspath(__file__))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from utils.errors import UserError, run_cli  # noqa: E402  (a leaf module: cheap, and needed for the exit wrapper)
from utils.flags import Parser  # noqa: E402  (a leaf module too)

PROG = 'demo.py'


# ============================================== command line ==========================================================
def get_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split('\n\n')[0], allow_abbrev=False, error_class=UserError,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)     # a bad flag: one line, as every error
    p.add_argument('--out', type=str, default='demo_output', help='everything goes here')
    g = p.add_argument_group('data')
    g.add_argument('--classes', type=int, default=8, help='number of procedural classes (2-8)')
    g.add_argument('--num_train', type=int, default=200, help='training images per class')
    g.add_argument('--num_val', type=int, default=25, help='validation images per class')
    g.add_argument('--pn', type=str, default='1_2_4_8', help='token-map side per scale; image side = tokenizer '
                   'downsampling x last (4 x 8 = 32 px)')
    g = p.add_argument_group('tokenizer (train_vae.py)')
    g.add_argument('--vocab_size', type=int, default=256)
    g.add_argument('--z_channels', type=int, default=16)
    g.add_argument('--vae_ch', type=int, default=32, help='tokenizer width')
    g.add_argument('--vae_ch_mult', type=str, default='1_2_4', help='tokenizer levels: 1_2_4 is 4x downsampling (the '
                   'published tokenizer is 1_1_2_2_4, 16x)')
    g.add_argument('--vae_norm_groups', type=int, default=8, help='GroupNorm groups (32 would be an instance norm at '
                   'width 32: reconstructions lose their colours)')
    g.add_argument('--vae_ep', type=int, default=8)
    g.add_argument('--vae_bs', type=int, default=16)
    g.add_argument('--vae_lr', type=float, default=3e-3)
    g.add_argument('--vae_warmup', type=int, default=1, help='epochs of plain autoencoding before the codebook is '
                   'seeded from encoder outputs (train_vae.py --ae_warmup)')
    g.add_argument('--vae_extra', type=str, default='', help='more train_vae.py flags, e.g. "--l1 1"')
    g = p.add_argument_group('VIAR (train.py --use_implicit)')
    g.add_argument('--depth', type=int, default=1, help='nominal depth: width 64 x depth, depth heads')
    g.add_argument('--p_depth', type=int, default=1, help='pre and post blocks around the implicit block')
    g.add_argument('--var_ep', type=int, default=14)
    g.add_argument('--var_bs', type=int, default=16)
    g.add_argument('--tblr', type=float, default=5e-2, help='base lr (lr = tblr x bs / 256)')
    g.add_argument('--var_extra', type=str, default='', help='more train.py flags')
    g = p.add_argument_group('sampling (gen_img.py), speed and scoring')
    g.add_argument('--iters', type=str, nargs='+', default=['10-10', '1-1'], metavar='LEFT-RIGHT',
                   help='implicit-iteration schedules (iter_left-iter_right), one grid each; the first is the '
                        'reference (10-10: the paper)')
    g.add_argument('--iter_tol', type=float, default=0.05, help='adds an adaptive schedule: the first of --iters, '
                   'each scale stopping once the relative fixed-point residual is below this (0: none)')
    g.add_argument('--per_class', type=int, default=8, help='samples per class and schedule (seeds 0..n-1)')
    g.add_argument('--cfg', type=float, default=2.0, help='classifier-free guidance')
    g.add_argument('--speed_batch', type=int, default=16, help='batch size of the images/s measurement')
    g.add_argument('--clf_steps', type=int, default=150, help='training steps of the scoring classifier')
    g = p.add_argument_group('run')
    g.add_argument('--device', type=str, default='cpu', choices=('cpu', 'cuda', 'auto'))
    g.add_argument('--threads', type=int, default=0, help='CPU threads of every stage (0: torch default, one per core)')
    return p


@dataclass
class Plan:
    """What the flags mean, worked out (and checked) before anything runs."""
    patch_nums: List[int]
    vae_ch_mult: List[int]
    reso: int
    schedules: List['Schedule']         # the ones of --iters, then (with --iter_tol) the adaptive one
    names: List[str]                    # class names in label order (sorted, as the ImageFolder loaders number them)


@dataclass(frozen=True)
class Schedule:
    """An implicit-iteration schedule: ``iter_left`` at the first scale to ``iter_right`` at the last, and with ``tol``
    each scale stops early once the relative fixed-point residual is below it (``--iter_tol`` of the samplers)."""
    il: int
    ir: int
    tol: Optional[float] = None

    @property
    def key(self) -> str:
        return f'{self.il}-{self.ir}' + ('' if self.tol is None else f'-tol{self.tol:g}')

    @property
    def title(self) -> str:
        return f'implicit iterations {self.il} -> {self.ir}' + ('' if self.tol is None else f', tol {self.tol:g}')

    def flags(self) -> List[str]:
        return ['--iter_left', str(self.il), '--iter_right', str(self.ir)] + (
            [] if self.tol is None else ['--iter_tol', f'{self.tol:g}'])

    def kwargs(self) -> dict:
        return dict(iter_left=self.il, iter_right=self.ir, iter_tol=self.tol)


def check_args(args) -> Plan:
    """Every flag checked up front; a problem is one ``UserError`` sentence naming the flag."""
    from utils import demo_data
    from utils.arg_util import parse_patch_nums
    from utils.flags import parse_iterations
    n_max = len(demo_data.CLASSES)
    if not 2 <= args.classes <= n_max:
        raise UserError(f'--classes must be 2 to {n_max} (the demo dataset has {n_max} classes), got {args.classes}')
    positive = ('num_train', 'num_val', 'vocab_size', 'z_channels', 'vae_ch', 'vae_norm_groups', 'vae_ep', 'vae_bs',
                'depth', 'var_ep', 'var_bs', 'per_class', 'speed_batch', 'clf_steps')
    for k in positive:
        if getattr(args, k) < 1:
            raise UserError(f'--{k} must be >= 1, got {getattr(args, k)}')
    for k in ('p_depth', 'vae_warmup', 'threads'):
        if getattr(args, k) < 0:
            raise UserError(f'--{k} must be >= 0, got {getattr(args, k)}')
    if args.vocab_size < 2:
        raise UserError(f'--vocab_size must be >= 2, got {args.vocab_size}')
    if args.vae_warmup >= args.vae_ep:
        raise UserError(f'--vae_warmup ({args.vae_warmup}) must be smaller than --vae_ep ({args.vae_ep}): the codebook '
                        f'is trained after the warm-up')
    for k in ('vae_lr', 'tblr'):
        if not getattr(args, k) > 0:
            raise UserError(f'--{k} must be > 0, got {getattr(args, k)}')
    if not args.cfg >= 0:
        raise UserError(f'--cfg must be >= 0, got {args.cfg}')
    try:
        patch_nums = parse_patch_nums(args.pn)
    except argparse.ArgumentTypeError as e:
        raise UserError(str(e)) from e
    try:
        ch_mult = [int(m) for m in args.vae_ch_mult.split('_')]
    except ValueError:
        ch_mult = []
    if not ch_mult or min(ch_mult) < 1:
        raise UserError(f'--vae_ch_mult must look like 1_2_4 (positive width multipliers), got {args.vae_ch_mult!r}')
    if args.vae_ch % args.vae_norm_groups:
        raise UserError(f'--vae_ch {args.vae_ch} must be a multiple of --vae_norm_groups {args.vae_norm_groups}')
    reso = 2 ** (len(ch_mult) - 1) * patch_nums[-1]
    if reso < 8:
        raise UserError(f'the images would be {reso} px (tokenizer downsampling x last of --pn); the demo needs >= 8')
    made = demo_data.dataset_reso(os.path.join(args.out, 'data'))
    if made is not None and made != reso:
        down = 2 ** (len(ch_mult) - 1)
        fit = f'end --pn with {made // down} (e.g. 1_2_4_{made // down})' if made % down == 0 else 'change --pn'
        raise UserError(f'--pn {args.pn} with --vae_ch_mult {args.vae_ch_mult} ({down}x downsampling) gives {reso} px '
                        f'images, but {os.path.join(args.out, "data")} holds the demo pictures at {made} px: {fit}, '
                        f'or pass another --out')
    pairs = [parse_iterations(s, '--iters', UserError) for s in args.iters]
    if any(min(p) < 1 for p in pairs):
        raise UserError(f'--iters {" ".join(args.iters)}: iteration counts must be >= 1')
    schedules = [Schedule(*p) for p in pairs]
    if len(set(schedules)) < len(schedules):
        raise UserError(f'--iters {" ".join(args.iters)}: a schedule is given twice')
    if not (math.isfinite(args.iter_tol) and args.iter_tol >= 0):
        raise UserError(f'--iter_tol must be >= 0 (0: no adaptive schedule), got {args.iter_tol}')
    if args.iter_tol > 0:
        schedules.append(Schedule(schedules[0].il, schedules[0].ir, args.iter_tol))
    for k in ('vae_extra', 'var_extra'):
        try:
            shlex.split(getattr(args, k))
        except ValueError as e:
            raise UserError(f'--{k} {getattr(args, k)!r}: {e}') from e
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise UserError('--device cuda: no CUDA device is visible; use --device cpu')
    return Plan(patch_nums=patch_nums, vae_ch_mult=ch_mult, reso=reso, schedules=schedules,
                names=sorted(demo_data.class_names(args.classes)))


# ============================================== the run ===============================================================
@dataclass
class Demo:
    """One demo run: flags, plan, output paths, the report every stage adds to, and the stage timings."""
    args: argparse.Namespace
    plan: Plan
    out: str
    env: Dict[str, str]
    report: Dict = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    @property
    def log_path(self) -> str:
        return self.path('demo_log.txt')

    @property
    def vae_ckpt(self) -> str:
        a = self.args
        return self.path('vae', f'vae_ch{a.vae_ch}v{a.vocab_size}z{a.z_channels}.pth')

    @property
    def var_ckpt(self) -> str:
        return self.path('viar', 'ar-ckpt-last.pth')

    def sample_dir(self, sched: Schedule) -> str:
        return self.path('samples', f'iters-{sched.key}', 'ar-ckpt-last')

    def script(self, stage: str, cmd: Sequence[str]) -> None:
        """Runs one of the repository's scripts as a subprocess, echoing its output and keeping a copy in the log."""
        cmd = [sys.executable, *cmd]
        print(f'\n[demo] === {stage}: {" ".join(shlex.quote(c) for c in cmd)}', flush=True)
        with open(self.log_path, 'a', encoding='utf-8') as log:
            log.write(f'\n=== {stage}: {" ".join(shlex.quote(c) for c in cmd)}\n')
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        if rc == 130:
            raise KeyboardInterrupt
        if rc != 0:
            raise UserError(f'stage "{stage}" failed (exit status {rc}; its output is above and in {self.log_path}); '
                            f'fix what it says and rerun the same command: finished stages are skipped and an '
                            f'interrupted training resumes')


def steps_of(n_images: int, bs: int, ep: int) -> int:
    """Optimiser steps of a training script on one process: ceil(images / batch) per epoch."""
    return math.ceil(n_images / bs) * ep


def read_json_lines(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip().startswith('{')]


# ---------------------------------------------- 1. data --------------------------------------------------------------
def stage_data(d: Demo) -> None:
    from utils import demo_data
    a = d.args
    demo_data.make_demo_dataset(d.path('data'), num_train=a.num_train, num_val=a.num_val, num_classes=a.classes,
                                reso=d.plan.reso)
    d.report['data'] = {'path': d.path('data'), 'classes': d.plan.names, 'reso': d.plan.reso,
                        'train_images': a.num_train * a.classes, 'val_images': a.num_val * a.classes}


# ---------------------------------------------- 2. tokenizer ---------------------------------------------------------
def stage_tokenizer(d: Demo) -> None:
    a = d.args
    d.script('tokenizer', [
        'train_vae.py', '--data_path', d.path('data'), '--pn', a.pn, '--mid_reso', '1.0', '--ch', str(a.vae_ch),
        '--ch_mult', a.vae_ch_mult, '--num_res_blocks', '1', '--attn', 'False', '--norm_groups', str(a.vae_norm_groups),
        '--vocab_size', str(a.vocab_size), '--z_channels', str(a.z_channels), '--bs', str(a.vae_bs), '--ep',
        str(a.vae_ep), '--lr', str(a.vae_lr), '--wp', '0.5', '--ae_warmup', str(a.vae_warmup), '--code_restart', '25',
        '--seed', '0', '--device', a.device, '--threads', str(a.threads), '--local_out_dir_path', d.path('vae'),
        '--save_freq', str(max(1, a.vae_ep // 3))] + shlex.split(a.vae_extra))
    if not os.path.isfile(d.vae_ckpt):
        raise UserError(f'train_vae.py finished without writing {d.vae_ckpt}; delete {d.path("vae")} and rerun')
    val = [e for e in read_json_lines(d.path('vae', 'log.txt')) if 'val_MSE' in e]
    recon = sorted(glob.glob(d.path('vae', 'recon', 'ep*.png')))
    d.report['tokenizer'] = {
        'checkpoint': d.vae_ckpt, 'steps': steps_of(a.num_train * a.classes, a.vae_bs, a.vae_ep),
        'val_mse': [round(e['val_MSE'], 5) for e in val], 'val_psnr': round(val[-1]['val_PSNR'], 2) if val else None,
        'codes_used_pct_per_scale': [round(u, 1) for u in val[-1]['val_code_used_pct']] if val else None,
        'recon_grid': recon[-1] if recon else None}


# ---------------------------------------------- 3. VIAR --------------------------------------------------------------
def stage_viar(d: Demo) -> None:
    a = d.args
    d.script('VIAR', [
        'train.py', '--data_path', d.path('data'), '--vae_ckpt', d.vae_ckpt, '--pn', a.pn, '--mid_reso', '1.0',
        '--depth', str(a.depth), '--use_implicit', 'True', '--p_depth', str(a.p_depth), '--bs', str(a.var_bs),
        '--ep', str(a.var_ep), '--tblr', str(a.tblr), '--wp', f'{a.var_ep / 24:g}', '--seed', '0',
        '--device', a.device, '--local_out_dir_path', d.path('viar'), '--save_freq', str(max(1, a.var_ep // 2))]
        + shlex.split(a.var_extra))
    if not os.path.isfile(d.var_ckpt):
        raise UserError(f'train.py finished without writing {d.var_ckpt}; delete {d.path("viar")} and rerun')
    log = read_json_lines(d.path('viar', 'log.txt'))
    train_ep = [e for e in log if 'L_mean' in e]
    val_ep = [e for e in log if 'vL_mean' in e]
    d.report['viar'] = {
        'checkpoint': d.var_ckpt, 'steps': steps_of(a.num_train * a.classes, a.var_bs, a.var_ep),
        'train_token_loss': [round(e['L_mean'], 4) for e in train_ep],
        'val_token_loss': round(val_ep[-1]['vL_mean'], 4) if val_ep else None,
        'val_token_accuracy_pct': round(val_ep[-1]['vacc_mean'], 2) if val_ep else None}


# ---------------------------------------------- 4. samples -----------------------------------------------------------
def stage_samples(d: Demo) -> None:
    a, plan = d.args, d.plan
    seeds, labels = list(range(a.per_class)), list(range(len(plan.names)))
    grids = {}
    for sc in plan.schedules:
        sub = d.sample_dir(sc)
        pngs = [os.path.join(sub, f'class{c}_seed{s}.png') for c in labels for s in seeds]
        grid = glob.glob(os.path.join(sub, '*_grid.png'))
        if grid and all(os.path.isfile(p) for p in pngs):
            print(f'[demo] samples with {sc.title} exist: {grid[0]}', flush=True)
        else:
            d.script(f'samples {sc.key}', [
                'gen_img.py', '--var_ckpt', d.var_ckpt, '--vae_ckpt', d.vae_ckpt, '--use_implicit', 'True',
                '--depth', str(a.depth), '--class_label', *map(str, labels), '--seeds', *map(str, seeds),
                '--cfg', str(a.cfg), *sc.flags(), '--output_dir', os.path.dirname(sub), '--save_grid', 'True',
                '--nrow', str(a.per_class), '--device', a.device])
            grid = glob.glob(os.path.join(sub, '*_grid.png'))
        grids[sc.key] = grid[0]
    d.report['samples'] = {'per_class': a.per_class, 'cfg': a.cfg, 'rows': plan.names,
                           'folders': {sc.key: d.sample_dir(sc) for sc in plan.schedules}, 'grids': grids}


def side_by_side(d: Demo, path: str, zoom: int) -> str:
    """The grids of all schedules next to each other, each under a title line, rows labelled with the class names
    (nearest-neighbour zoom: every generated pixel stays visible)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    grids = []
    for key, g in d.report['samples']['grids'].items():
        with Image.open(g) as im:
            grids.append((key, im.convert('RGB').resize((im.width * zoom, im.height * zoom), Image.NEAREST)))
    speed = d.report.get('speed', {})
    score = d.report.get('score', {}).get('sample_accuracy', {})
    label_w = 8 + max(int(font.getlength(n)) for n in d.plan.names)
    title_h, gap = 34, 16
    W = label_w + sum(g.width for _, g in grids) + gap * (len(grids) - 1) + 8
    H = title_h + max(g.height for _, g in grids) + 4
    canvas = Image.new('RGB', (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cell = (grids[0][1].height - 2 * zoom) / len(d.plan.names)          # make_grid: 2 px padding around each image
    for r, n in enumerate(d.plan.names):
        draw.text((4, title_h + 2 * zoom + (r + 0.5) * cell - 6), n, fill=(0, 0, 0), font=font)
    x = label_w
    titles = {sc.key: sc.title for sc in d.plan.schedules}
    for key, g in grids:
        title = titles[key]
        sub = []
        if key in score:
            sub.append(f'{100 * score[key]:.0f}% recognised')
        if key in speed.get('images_per_s', {}):
            sub.append(f'{speed["images_per_s"][key]:.1f} images/s')
        draw.text((x + 2, 4), title, fill=(0, 0, 0), font=font)
        draw.text((x + 2, 18), ', '.join(sub), fill=(60, 60, 60), font=font)
        canvas.paste(g, (x, title_h))
        x += g.width + gap
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)
    return path


# ---------------------------------------------- 5. speed -------------------------------------------------------------
def stage_speed(d: Demo) -> None:
    """Images/s of each schedule (the best of three batches of ``--speed_batch`` images, classes in turn, after a
    warm-up batch), and
    the relative fixed-point residual ``|z_i - z_(i-1)| / |z_i|`` of the last implicit iteration at each scale."""
    import torch

    from models.checkpoint import load_vae_var
    from utils.model_io import model_errors
    a, plan = d.args, d.plan
    dev = torch.device('cuda' if a.device == 'cuda' or (a.device == 'auto' and torch.cuda.is_available()) else 'cpu')
    print(f'\n[demo] === speed: {a.speed_batch} images per schedule on {dev.type} '
          f'({torch.get_num_threads()} CPU threads), after a warm-up batch', flush=True)
    with model_errors():
        _, var = load_vae_var(d.vae_ckpt, d.var_ckpt, device=dev)
    label_B = torch.arange(a.speed_batch, device=dev) % len(plan.names)
    kw = dict(B=a.speed_batch, label_B=label_B, cfg=a.cfg, top_k=min(900, var.V), top_p=0.96)
    res = {'batch': a.speed_batch, 'device': dev.type, 'threads': torch.get_num_threads(), 'iterations_per_scale': {},
           'images_per_s': {}, 'last_residual_per_scale': {}}
    with torch.inference_mode():
        for sc in plan.schedules:
            key = sc.key
            var.autoregressive_infer_cfg(g_seed=1, **sc.kwargs(), **kw)         # warm-up
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            best = float('inf')
            for rep in range(3):            # the best of three timed batches: another process's burst is not ours
                t0 = time.perf_counter()
                var.autoregressive_infer_cfg(g_seed=2 + rep, **sc.kwargs(), **kw)
                if dev.type == 'cuda':
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            res['images_per_s'][key] = round(a.speed_batch / best, 2)
            trace = {}
            var.autoregressive_infer_cfg(g_seed=2, trace=trace, **sc.kwargs(), **kw)
            res['iterations_per_scale'][key] = [int(n) for n in trace['iters']]
            res['last_residual_per_scale'][key] = [float(f'{r[-1]:.3g}') if r else None for r in trace['residual']]
            print(f'[demo] {key}: {res["images_per_s"][key]:.1f} images/s; residual of the last iteration per scale '
                  f'{res["last_residual_per_scale"][key]}', flush=True)
    d.report['speed'] = res


# ---------------------------------------------- 6. score -------------------------------------------------------------
def load_pngs(paths: Sequence[str]):
    import numpy as np
    import torch
    from PIL import Image
    imgs = []
    for p in paths:
        with Image.open(p) as im:
            imgs.append(torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(imgs)


def stage_score(d: Demo) -> None:
    """The demo classifier's verdicts: real validation images, their reconstructions, and the samples of every
    schedule -- as asked for, and (the baseline of an unconditional generator) as the next class in the row order."""
    import torch

    from models.checkpoint import load_vae
    from models.demo_classifier import classify, train_classifier
    from utils import demo_data
    from utils.model_io import model_errors
    a, plan = d.args, d.plan
    x_tr, y_tr, tr_names = demo_data.load_folder(d.path('data', 'train'))
    x_va, y_va, _ = demo_data.load_folder(d.path('data', 'val'))
    if tr_names != plan.names:
        raise UserError(f'{d.path("data")} holds the classes {tr_names}, not {plan.names}; delete it and rerun')
    print(f'\n[demo] === score: the classifier trains on {len(x_tr)} images ({a.clf_steps} steps)', flush=True)
    clf = train_classifier(x_tr, y_tr, len(plan.names), steps=a.clf_steps)
    real_acc = (classify(clf, x_va) == y_va).float().mean().item()
    with model_errors():
        vae = load_vae(d.vae_ckpt, 'cpu', patch_nums=tuple(plan.patch_nums))
    with torch.no_grad():
        rec = torch.cat([vae.img_to_reconstructed_img(x_va[i:i + 64], last_one=True) for i in range(0, len(x_va), 64)])
    rec_acc = (classify(clf, rec) == y_va).float().mean().item()
    n = len(plan.names)
    res = {'chance': 1 / n, 'real_val_accuracy': real_acc, 'recon_val_accuracy': rec_acc, 'sample_accuracy': {},
           'sample_accuracy_per_class': {}, 'sample_accuracy_next_class': {}}
    want = torch.arange(n).repeat_interleave(a.per_class)
    for sc in plan.schedules:
        key, sub = sc.key, d.sample_dir(sc)
        pred = classify(clf, load_pngs([os.path.join(sub, f'class{c}_seed{s}.png')
                                        for c in range(n) for s in range(a.per_class)]))
        hit = (pred == want).float()
        res['sample_accuracy'][key] = hit.mean().item()
        res['sample_accuracy_per_class'][key] = dict(zip(plan.names, hit.view(n, -1).mean(1).tolist()))
        res['sample_accuracy_next_class'][key] = (pred == (want + 1) % n).float().mean().item()
    d.report['score'] = res


# ---------------------------------------------- 7. editing -----------------------------------------------------------
# (name, --box y0,x0,y1,x1, more flags): the right half re-drawn without a class; the middle kept and a border of one
# token drawn around it (on the 8x8 grid of 32 px and the 4x4 grid of 16 px alike); and that middle re-drawn as
# another class.  A small region inside the shape keeps the coarse scales of the input (they are mostly outside it):
# a class edit needs a region that covers the shape.
EDITS = (('inpaint', '0,0.5,1,1', ()), ('outpaint', '0.15,0.15,0.85,0.85', ('--outpaint', 'True')),
         ('class_edit', '0.15,0.15,0.85,0.85', ('--class_label', '{dst}')))


def stage_edit(d: Demo) -> None:
    """Zero-shot editing with ``python -m scripts.edit`` on the first validation image of the red disc (with other
    --classes: of the first class): in-painting, out-painting, and a class edit to the blue triangle (or the next
    class); one grid each: the original, the masked input, one result per seed.  VIAR at the first schedule."""
    a, plan = d.args, d.plan
    src_class = 'red_disc' if 'red_disc' in plan.names else plan.names[0]
    dst_class = 'blue_triangle' if 'blue_triangle' in plan.names else plan.names[(plan.names.index(src_class) + 1)
                                                                                    % len(plan.names)]
    dst = plan.names.index(dst_class)       # gen_img / edit labels = sorted folder order = plan.names
    src = d.path('data', 'val', src_class, '00000.png')
    stem = os.path.splitext(os.path.basename(src))[0]
    grids, boxes = {}, {}
    for kind, box, extra in EDITS:
        extra = [e.format(dst=dst) for e in extra]
        region = 'outpaint' if '--outpaint' in extra else 'inpaint'
        suffix = f'_class{dst}' if '--class_label' in extra else ''
        grid = d.path('edit', kind, 'ar-ckpt-last', f'{stem}_{region}{suffix}_grid.png')
        if os.path.isfile(grid):
            print(f'[demo] {kind} exists: {grid}', flush=True)
        else:
            d.script(f'edit ({kind})', [
                '-m', 'scripts.edit', '--input_img', src, '--box', box, *extra, '--seeds', '0', '1', '2', '3',
                '--var_ckpt', d.var_ckpt, '--vae_ckpt', d.vae_ckpt, '--use_implicit', 'True', '--cfg', str(a.cfg),
                *plan.schedules[0].flags(), '--output_dir', d.path('edit', kind), '--device', a.device])
        grids[kind], boxes[kind] = grid, box
    d.report['edit'] = {'input': src, 'input_class': src_class, 'class_edit_to': plan.names[dst],
                        'boxes_y0_x0_y1_x1': boxes, 'grids': grids}


# ---------------------------------------------- the stages -----------------------------------------------------------
@dataclass
class Stage:
    name: str
    run: Callable[[Demo], None]


# A stage is a function that reads what earlier stages put in ``d.report`` and adds its own section (and its lines to
# ``summary``); a new one (e.g. a quality-compute sweep) slots in here.
STAGES: List[Stage] = [
    Stage('data', stage_data),
    Stage('tokenizer', stage_tokenizer),
    Stage('viar', stage_viar),
    Stage('samples', stage_samples),
    Stage('speed', stage_speed),
    Stage('score', stage_score),
    Stage('edit', stage_edit),
]


def summary(d: Demo, total_s: float) -> List[str]:
    r, names = d.report, d.plan.names
    sc, sp = r['score'], r['speed']
    t = ', '.join(f'{k} {v:.0f} s' for k, v in d.timings.items())
    lines = [f'===== demo done in {total_s / 60:.1f} min ({t}) =====',
             f'grids, side by side: {r["grids_side_by_side"]}',
             f'  rows, top to bottom: {", ".join(names)}']
    label = {s.key: f'{s.il}->{s.ir}' + ('' if s.tol is None else f' tol {s.tol:g}') for s in d.plan.schedules}
    lines += [f'  {label[k]}: {g}' for k, g in r['samples']['grids'].items()]
    lines += ['', f'  {"iterations":<18}{"run per scale":<16}{"images/s":>9}{"recognised":>12}{"worst class":>24}']
    for key in r['samples']['grids']:
        per = sc['sample_accuracy_per_class'][key]
        worst = min(per, key=per.get)
        lines.append(f'  {label[key]:<18}{" ".join(map(str, sp["iterations_per_scale"][key])):<16}'
                     f'{sp["images_per_s"][key]:>9.1f}{100 * sc["sample_accuracy"][key]:>11.0f}%'
                     f'{f"{worst} {100 * per[worst]:.0f}%":>24}')
    nxt = ', '.join(f'{100 * v:.0f}%' for v in sc['sample_accuracy_next_class'].values())
    lines += ['', f'recognised = the demo classifier sees the requested class (chance {100 * sc["chance"]:.0f}%; '
                  f'as the next class instead: {nxt})',
              f'the classifier on real validation images: {100 * sc["real_val_accuracy"]:.0f}%, on their tokenizer '
              f'reconstructions: {100 * sc["recon_val_accuracy"]:.0f}% (the ceiling for samples)',
              f'tokenizer reconstructions (inputs, then each scale): {r["tokenizer"]["recon_grid"]}',
              f'editing a {r["edit"]["input_class"]} (original, masked input, 4 seeds):',
              f'  right half in-painted: {r["edit"]["grids"]["inpaint"]}',
              f'  border out-painted: {r["edit"]["grids"]["outpaint"]}',
              f'  edited to {r["edit"]["class_edit_to"]}: {r["edit"]["grids"]["class_edit"]}',
              f'report: {d.path("report.json")}; TensorBoard: tensorboard --logdir {d.out}',
              '',
              'next:',
              '  python demo.py --help                              # the knobs: classes, epochs, widths, schedules',
              '  python gen_img.py --use_implicit --save_grid       # the published VIAR (ckpts/README.md)',
              '  bash scripts/eval.sh                               # FID of the published checkpoints']
    return lines


def run(args) -> None:
    plan = check_args(args)
    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --out {args.out!r} ({e.strerror or e}); pass another folder') from e
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    d = Demo(args=args, plan=plan, out=out, env=env)
    t_start = time.time()
    for st in STAGES:
        t0 = time.time()
        st.run(d)
        d.timings[st.name] = time.time() - t0
        print(f'[demo] {st.name}: {d.timings[st.name]:.0f} s', flush=True)
    zoom = max(1, 128 // plan.reso)
    d.report['grids_side_by_side'] = side_by_side(d, d.path('grids.png'), zoom)
    total = time.time() - t_start
    d.report.update(config=vars(args), timings_s={k: round(v, 1) for k, v in d.timings.items()},
                    total_s=round(total, 1))
    # the acceptance numbers at the top level too (the reference schedule is the first of --iters)
    ref = plan.schedules[0].key
    sc = d.report['score']
    d.report.update(recon_val_accuracy=sc['recon_val_accuracy'], real_val_accuracy=sc['real_val_accuracy'],
                    reference_schedule=ref, sample_accuracy=sc['sample_accuracy'],
                    sample_accuracy_per_class=sc['sample_accuracy_per_class'])
    with open(d.path('report.json') + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(d.report, f, indent=1)
    os.replace(d.path('report.json') + '.tmp', d.path('report.json'))
    print()
    for line in summary(d, total):
        print(f'[demo] {line}' if line else '', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(lambda: run(get_parser().parse_args(argv)), PROG,
                   interrupted='interrupted; rerun the same command to continue where it stopped')


if __name__ == '__main__':
    raise SystemExit(main())
