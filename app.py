"""A web app (Gradio) to play with a VAR, VIAR or FlexVAR model: generate, turn VIAR's iteration knob, edit.

    pip install -r requirements-app.txt
    python app.py                       # the demo's model (demo_output/) if there, else the published VIAR
    python app.py --depth 16 --port 7861 --device cuda   # the published VAR-d16; or --var_ckpt, --pretrained

Generate tab: class, seeds, sampler settings and the iteration schedule; shows the images, images/s, the iterations
run and the fixed-point residual at every scale, and the same seeds under a second schedule side by side.  Edit tab:
zero-shot in-painting, out-painting or re-drawing as a class of a region painted on an image or typed as a box.
Both are API endpoints for ``gradio_client``: ``/generate`` (class_label, seed, cfg, iter_left, iter_right, ...) and
``/edit`` (image, mask, box, mode, class_label, seed, cfg, iter_left, iter_right, ...), images first (README, "Web
app").  The model is loaded once; calls are queued and run one at a time.  A bad input is one message on the page,
never a traceback; images are those of ``gen_img.py`` / ``scripts/edit.py`` with the same settings (the same calls).
"""
import argparse
import functools
import glob
import json
import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from models import get_edit_mask
from models.flexvar import FlexVAR
from utils.editing import (
    EditError,
    check_region,
    edit_mask_from_image,
    load_image,
    masked_preview,
    parse_box,
    square_input,
)
from utils.errors import UserError, one_line, run_cli
from utils.plot import Panel, render_panels
from utils.sampler_settings import SamplerSettings, SettingsError
from utils.sampling_utils import (
    SEED_MAX,
    SEED_MIN,
    add_device_args,
    add_model_args,
    default_var_ckpt,
    dtype_name,
    load_models,
    sample_batch,
    schedule_name,
    setup_device,
    to_uint8,
)
from utils.zoo import VIAR_MODEL, default_path

PROG = 'app.py'
MAX_IMAGES = 16         # images per call (one sampler call each)
PUBLISHED_VIAR = default_path(VIAR_MODEL)
EDIT_MODES = {'in-paint': 'inpaint', 'out-paint': 'outpaint', 're-draw as a class': 'class'}


class AppError(UserError):
    """A bad input or setting of the app; shown as one message on the page (or one line at start-up)."""


# ================================ which model =========================================================================
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f'python {PROG}', description=__doc__.split('\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--var_ckpt', type=str, default=None,
                   help='VAR/VIAR/FlexVAR checkpoint (default: the demo\'s VIAR in --demo_dir if there, else '
                        f'{PUBLISHED_VIAR}, downloaded on first use; --depth N alone: ckpts/var_dN.pth)')
    p.add_argument('--demo_dir', type=str, default='demo_output',
                   help='output of demo.py / scripts/demo.sh: its VIAR, tokenizer, class names and validation images')
    add_model_args(p)
    p.set_defaults(use_implicit=None)       # not stated: any family
    p.add_argument('--port', type=int, default=None, help='port (default: $GRADIO_SERVER_PORT or 7860)')
    p.add_argument('--host', type=str, default=None,
                   help='address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1, this machine only; '
                        '0.0.0.0: the network)')
    p.add_argument('--share', action='store_true', help="also serve through a public gradio.live link (Gradio's "
                   'share tunnel; needs the internet)')
    add_device_args(p)
    return p


def demo_files(demo_dir: str) -> tuple[str, str] | None:
    """(tokenizer, VIAR) checkpoints of a finished demo run in ``demo_dir`` (demo.py's file names), else None."""
    var_ckpt = os.path.join(demo_dir, 'viar', 'ar-ckpt-last.pth')
    if not os.path.isfile(var_ckpt):
        return None
    found = []
    try:        # the report names the tokenizer (its folder may have moved: the file name alone is used)
        with open(os.path.join(demo_dir, 'report.json'), encoding='utf-8') as f:
            found.append(os.path.join(demo_dir, 'vae', os.path.basename(json.load(f)['tokenizer']['checkpoint'])))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found += sorted(glob.glob(os.path.join(demo_dir, 'vae', 'vae_ch*.pth')))
    found = [p for p in found if os.path.isfile(p)]
    return (found[0], var_ckpt) if found else None


def demo_class_names(demo_dir: str) -> list[str] | None:
    """The demo's class names in label order (its report, else the sorted class folders of its data)."""
    try:
        with open(os.path.join(demo_dir, 'report.json'), encoding='utf-8') as f:
            return list(json.load(f)['data']['classes'])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    train = os.path.join(demo_dir, 'data', 'train')
    names = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))) if os.path.isdir(train) \
        else []
    return names or None


def validation_images(demo_dir: str, per_class: int = 4) -> list[str]:
    """The first ``per_class`` validation images of every class of the demo's data (empty without it)."""
    out = []
    for d in sorted(glob.glob(os.path.join(demo_dir, 'data', 'val', '*'))):
        out += sorted(glob.glob(os.path.join(d, '*.png')))[:per_class]
    return out


def imagenet_class_names() -> list[str] | None:
    """ImageNet-1k's class names in label order, from torchvision's bundled weight metadata (no download)."""
    try:
        names = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta['categories'])
    except (AttributeError, KeyError):
        return None
    return names if len(names) == 1000 else None


def choose_checkpoints(args: argparse.Namespace) -> tuple[str, bool]:
    """(model checkpoint or hub folder, whether it is the demo's); sets ``args.vae_ckpt`` for the demo's model."""
    if args.pretrained:
        return args.pretrained, False
    if args.var_ckpt is not None:
        return args.var_ckpt, False
    if args.depth is not None or args.use_implicit is not None:     # the published files, as gen_img.py picks them
        return default_var_ckpt(args, 30), False
    if os.path.isdir(args.demo_dir):
        found = demo_files(args.demo_dir)
        if found is not None:
            if args.vae_ckpt is None:
                args.vae_ckpt = found[0]
            return found[1], True
        print(f'[app] {args.demo_dir}/ holds no finished demo model (viar/ar-ckpt-last.pth and vae/vae_ch*.pth); '
              f'using {PUBLISHED_VIAR}', flush=True)
    return PUBLISHED_VIAR, False


# ================================ the model and its two calls ========================================================
def _int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` (a number from the page or the API) as an int in [lo, hi], else one AppError line."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AppError(f'{what} is empty: enter a whole number')
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise AppError(f'{what} {value!r} is not a number') from e
    if not f.is_integer():
        raise AppError(f'{what} {value} is not a whole number')
    v = int(f)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise AppError(f'{what} {v} out of range: it must be in {lo}..{hi}')
    return v


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise AppError(f'{what} {value!r} is not a number') from e


def _grid(tiles_N3HW: torch.Tensor, pad_value) -> np.ndarray:
    """``make_grid`` (2 px padding, up to 8 per row) as (H, W, 3) uint8; one image is returned as it is."""
    grid = torchvision.utils.make_grid(tiles_N3HW, nrow=min(len(tiles_N3HW), 8), padding=2, pad_value=pad_value)
    return grid.permute(1, 2, 0).contiguous().numpy()


class Engine:
    """The tokenizer and model (loaded once) and what the page asks of them; one sampling at a time."""

    def __init__(self, vae, var, device: torch.device, amp_dtype, var_ckpt: str, names: Sequence[str] | None,
                 val_images: Sequence[str] = (), defaults: SamplerSettings | None = None):
        self.vae, self.var, self.device, self.amp_dtype, self.var_ckpt = vae, var, device, amp_dtype, var_ckpt
        self.names = list(names) if names and len(names) == var.num_classes else None
        self.val_images = list(val_images)
        self.defaults = defaults or SamplerSettings()       # the page's sampler settings at start (a hub folder's)
        self.lock = threading.Lock()

    @property
    def implicit(self) -> bool:
        return bool(self.var.use_implicit)

    @property
    def flex(self) -> bool:
        return isinstance(self.var, FlexVAR)

    def describe(self) -> str:
        pn = self.var.patch_nums
        reso = pn[-1] * self.vae.downsample
        return (f'{self.var.describe()} from `{self.var_ckpt}`: {self.var.num_classes} classes, {reso} px '
                f'(scales {schedule_name(pn)}), {dtype_name(self.amp_dtype)} on {self.device.type}')

    def label(self, value: Any) -> int:
        return _int(value, 'class', 0, self.var.num_classes - 1)

    def seeds(self, seed: Any, n_images: Any) -> list[int]:
        n = _int(n_images, 'number of images', 1, MAX_IMAGES)
        s = _int(seed, 'seed', SEED_MIN, SEED_MAX - n + 1)
        return list(range(s, s + n))

    def settings(self, cfg, top_k, top_p, more_smooth, iter_left, iter_right, iter_tol, infer_pn) -> dict[str, Any]:
        """The sampler's keyword arguments, checked by the rules of the sampling scripts' flags (``iter_tol`` 0 or
        empty: off; ``infer_pn`` empty: the model's own schedule)."""
        tol = None if iter_tol in (None, '') or _float(iter_tol, 'iter_tol') == 0 else _float(iter_tol, 'iter_tol')
        pn = (infer_pn or '').strip() or None
        if pn is not None and not self.flex:
            raise AppError(f'a schedule ({pn}) was given, but this model ({self.var.describe()}) has fixed scales: '
                           f'leave it empty')
        settings = SamplerSettings(cfg=_float(cfg, 'cfg'), top_k=_int(top_k, 'top_k'), top_p=_float(top_p, 'top_p'),
                                   more_smooth=bool(more_smooth), iter_left=_int(iter_left, 'iter_left'),
                                   iter_right=_int(iter_right, 'iter_right'), iter_tol=tol, infer_patch_nums=pn)
        try:
            return settings.check().kwargs(self.var)
        except SettingsError as e:      # the flag rules' own words, without the command line's dashes
            raise AppError(one_line(e).replace('--', '')) from e

    def _sample(self, label: int, seeds: Sequence[int], kw: dict[str, Any]):
        """One ``sample_batch`` call per seed (B = 1, as gen_img.py): (images (N, 3, H, W) uint8, seconds, iterations
        run per seed and scale, residual of the last iteration per seed and scale)."""
        label_B = torch.tensor([label], dtype=torch.long, device=self.device)
        tiles, iters, resid, seconds = [], [], [], 0.0
        for s in seeds:
            trace = {}
            t0 = time.perf_counter()
            img_B3HW = sample_batch(self.var, label_B, s, dict(kw, trace=trace), self.amp_dtype)
            if self.device.type == 'cuda':
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            tiles.append(torch.from_numpy(to_uint8(img_B3HW)[0]).permute(2, 0, 1))
            iters.append([int(n) for n in trace.get('iters', [])])
            resid.append([float(r[-1]) if r else float('nan') for r in trace.get('residual', [])])
        return torch.stack(tiles), seconds, iters, resid

    def _schedule_text(self, kw: dict[str, Any]) -> str:
        parts = []
        if self.implicit:
            parts.append(f'{kw["iter_left"]}->{kw["iter_right"]} iterations')
            if kw.get('iter_tol') is not None:
                parts.append(f'early exit at residual {kw["iter_tol"]:g}')
        if self.flex:
            parts.append(f'scales {schedule_name(kw["infer_patch_nums"])}')
        return ', '.join(parts) or 'VAR (no iteration knob)'

    @staticmethod
    def _per_scale(rows: list[list[float]], fmt) -> str:
        """Per scale over the seeds: one value, or 'min–max' where the seeds differ."""
        out = []
        for col in zip(*rows):
            lo, hi = min(col), max(col)
            out.append(fmt(lo) if lo == hi else f'{fmt(lo)}–{fmt(hi)}')
        return ' · '.join(out)

    def _report(self, name: str, kw, n: int, seconds: float, iters, resid) -> str:
        line = (f'**{name}** ({self._schedule_text(kw)}): {n} image{"s" * (n > 1)} in {seconds:.3f} s, '
                f'**{n / max(seconds, 1e-9):.1f} images/s**')
        if self.implicit and iters and iters[0]:
            line += (f'  \niterations run per scale: {self._per_scale(iters, str)}  \nrelative fixed-point residual '
                     f'of the last iteration per scale: {self._per_scale(resid, lambda v: f"{v:.2g}")}')
        return line

    def _plot(self, runs: list[tuple[str, Any, Any]]) -> Image.Image | None:
        """Residual of the last iteration (the largest over the seeds) and iterations run (mean over the seeds) per
        scale, one line per schedule."""
        if not self.implicit:
            return None
        K = len(runs[0][1][0])
        top = max(max(max(row) for row in iters) for _, iters, _ in runs)
        res = Panel('fixed-point residual at the end of each scale', 'scale', '|z_n - z_(n-1)| / |z_n|', logy=True,
                    size=(430, 300), xlim=(0.7, K + 0.3), legend='lower right')
        its = Panel('implicit iterations run per scale', 'scale', 'iterations', size=(430, 300), xlim=(0.7, K + 0.3),
                    ylim=(0, top + 1), legend='lower right')
        for name, iters, resid in runs:
            xs = list(range(1, K + 1))
            res.line(xs, [max(col) for col in zip(*resid)], label=name)
            its.line(xs, [sum(col) / len(col) for col in zip(*iters)], label=name)
        return render_panels([res, its])

    def generate(self, class_label=0, seed=0, cfg=1.5, iter_left=10, iter_right=10, n_images=4, top_k=900,
                 top_p=0.96, more_smooth=False, iter_tol=0, infer_pn='', compare=False, iter_left_b=1,
                 iter_right_b=1, iter_tol_b=0, infer_pn_b=''):
        """Images of ``class_label`` for seeds ``seed .. seed + n_images - 1``: (grid of schedule A, grid of schedule
        B or None, a report in Markdown, the residual plot or None).  ``compare``: the same seeds also under schedule
        B (``*_b``)."""
        label, seeds = self.label(class_label), self.seeds(seed, n_images)
        kw_a = self.settings(cfg, top_k, top_p, more_smooth, iter_left, iter_right, iter_tol, infer_pn)
        kw_b = self.settings(cfg, top_k, top_p, more_smooth, iter_left_b, iter_right_b, iter_tol_b, infer_pn_b) \
            if compare else None
        with self.lock:
            a = self._sample(label, seeds, kw_a)
            b = self._sample(label, seeds, kw_b) if compare else None
        cls = f'class {label}' + (f' ({self.names[label]})' if self.names else '')
        text = [f'{cls}, seeds {seeds[0]}..{seeds[-1]}, cfg {kw_a["cfg"]:g}, top-k {kw_a["top_k"]}, '
                f'top-p {kw_a["top_p"]:g}{", more_smooth" if kw_a["more_smooth"] else ""}; one sampler call per '
                f'seed on {self.device.type}', self._report('A', kw_a, len(seeds), a[1], a[2], a[3])]
        runs = [(f'A: {self._schedule_text(kw_a)}', a[2], a[3])]
        if b is not None:
            text.append(self._report('B', kw_b, len(seeds), b[1], b[2], b[3]))
            runs.append((f'B: {self._schedule_text(kw_b)}', b[2], b[3]))
        return _grid(a[0], 255), None if b is None else _grid(b[0], 255), '\n\n'.join(text), self._plot(runs)

    def edit(self, image=None, mask=None, box='', mode='in-paint', class_label=0, seed=0, cfg=3.0, iter_left=10,
             iter_right=10, n_images=4, top_k=900, top_p=0.95, more_smooth=True, iter_tol=0):
        """Zero-shot editing (``scripts/edit.py``'s calls) of ``image`` (a path or PIL image): the region to generate
        is the white part of ``mask`` (any size of the image's aspect ratio; with ``out-paint`` the part kept), or
        the ``box`` 'y0,x0,y1,x1' (fractions of the side).  ``mode``: in-paint / out-paint (unconditional), or
        're-draw as a class' (``class_label``).  Returns (results grid, the original cropped to the model's square,
        the masked input, a report)."""
        region = EDIT_MODES.get(str(mode).strip(), str(mode).strip())
        if region not in EDIT_MODES.values():
            raise AppError(f'mode {mode!r} unknown: one of {", ".join(EDIT_MODES)}')
        if image is None or (isinstance(image, str) and not image.strip()):
            raise EditError('no image: upload one (or pick a validation image of the demo)')
        img = load_image(image, 'the uploaded image') if isinstance(image, (str, os.PathLike)) else \
            image.convert('RGB')
        box = (box or '').strip()
        if mask is not None and not isinstance(mask, Image.Image):
            mask = load_image(mask, 'the mask', mode='L')
        if mask is not None and box:
            raise EditError('both a painted mask and a box were given: clear one of them')
        if mask is None and not box:
            raise EditError('no region to edit: paint it on the image with the brush, or type a box y0,x0,y1,x1')
        label = self.label(class_label) if region == 'class' else self.var.num_classes     # unconditional otherwise
        seeds = self.seeds(seed, n_images)
        kw = self.settings(cfg, top_k, top_p, more_smooth, iter_left, iter_right, iter_tol, '')
        pns, grid = self.var.patch_nums, self.var.patch_nums[-1]
        if mask is not None:
            if not (np.asarray(mask.convert('L')) >= 128).any():
                raise EditError('the mask is empty: paint the region to edit with the brush (or type a box)')
            keep = edit_mask_from_image(mask, grid, image_size=img.size, flag='the mask', image_name='the image')
            keep = 1 - keep if region == 'outpaint' else keep
            keep = check_region(keep, 'the painted region' + (' (kept, out-paint)' if region == 'outpaint' else ''))
        else:
            y0, x0, y1, x1 = parse_box(box, 'the box')
            keep = check_region(get_edit_mask(pns, y0, x0, y1, x1, inpainting=region != 'outpaint'),
                                f'the box {box}' + (' (kept, out-paint)' if region == 'outpaint' else ''))
        orig, x = square_input(img, grid * self.vae.downsample)
        with self.lock:
            with torch.inference_mode():
                tokens = self.vae.img_to_idxBl(x.to(self.device), pns)     # fp32, outside autocast (scripts/edit.py)
            edit_kw = dict(kw, input_img_tokens=tokens, edit_mask=keep.to(self.device))
            tiles, seconds, iters, resid = self._sample(label, seeds, edit_kw)
        preview = masked_preview(orig.float() / 255, keep).mul(255).round().to(torch.uint8)
        what = {'inpaint': 'in-painting', 'outpaint': 'out-painting'}.get(region) or \
            f're-drawn as class {label}' + (f' ({self.names[label]})' if self.names else '')
        gen = int((keep < 0.5).sum())
        text = (f'{what}: {gen} of {grid * grid} tokens generated; seeds {seeds[0]}..{seeds[-1]}, cfg {kw["cfg"]:g}, '
                f'top-k {kw["top_k"]}, top-p {kw["top_p"]:g}{", more_smooth" if kw["more_smooth"] else ""}\n\n'
                + self._report('result', kw, len(seeds), seconds, iters, resid))
        return _grid(tiles, 255), _grid(orig[None], 255), _grid(preview[None], 255), text


def load_engine(args: argparse.Namespace) -> Engine:
    """The model of the flags (``choose_checkpoints``), loaded once; published files are downloaded on first use."""
    var_ckpt, is_demo = choose_checkpoints(args)
    device, amp_dtype = setup_device(args)
    vae, var = load_models(args, device, var_ckpt)
    names = getattr(var, 'class_names', None)       # recorded by train.py in newer checkpoints
    if not names and is_demo:
        names = demo_class_names(args.demo_dir)
    if not names and var.num_classes == 1000:
        names = imagenet_class_names()
    val = validation_images(args.demo_dir) if is_demo else []
    defaults = None
    if args.pretrained:     # a hub folder records its sampling defaults
        from utils.model_io import hub_sampler_settings
        defaults = hub_sampler_settings(getattr(args, 'pretrained_dir', None) or args.pretrained)
    return Engine(vae, var, device, amp_dtype, var_ckpt, names, val, defaults)


# ================================ the page ============================================================================
CSS = """
.pixels img { image-rendering: pixelated; width: 100% !important; height: 100% !important; object-fit: contain; }
"""


def import_gradio():
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')      # no usage statistics sent anywhere
    try:
        import gradio
    except ImportError as e:
        raise AppError('gradio is not installed: pip install -r requirements-app.txt') from e
    return gradio


def on_page(fn):
    """``fn`` for an event: a ``UserError`` becomes its sentence on the page (``gr.Error``); anything else a short
    message there, with the traceback in the server's log only.  The server keeps running in both cases."""
    gr = import_gradio()

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(one_line(e), print_exception=False) from e
        except Exception as e:
            traceback.print_exc()
            raise gr.Error(f'internal error ({type(e).__name__}: {one_line(e)[:200]}); the server log has the '
                           f'details', print_exception=False) from e
    return wrapped


def editor_inputs(value) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) of an ``ImageEditor`` value: the background, and white where any layer is painted (None when
    nothing is)."""
    if not value or value.get('background') is None:
        return None, None
    bg = value['background']
    painted = None
    for layer in value.get('layers') or []:
        if layer is None:
            continue
        a = np.asarray(layer.convert('RGBA'))[..., 3] > 0
        if a.shape != (bg.height, bg.width):
            a = np.asarray(Image.fromarray(a).resize(bg.size, Image.NEAREST))
        painted = a if painted is None else painted | a
    mask = None if painted is None or not painted.any() else Image.fromarray(painted.astype(np.uint8) * 255)
    if bg.mode in ('RGBA', 'LA', 'P'):
        flat = Image.new('RGB', bg.size, 'white')
        flat.paste(bg.convert('RGBA'), mask=bg.convert('RGBA').split()[3])
        bg = flat
    return bg.convert('RGB'), mask


def _class_inputs(gr, engine: Engine, default: int):
    """The class index and, with names, a searchable list of them that sets it."""
    if engine.names:
        choices = [(f'{i}: {n}', i) for i, n in enumerate(engine.names)]
        pick = gr.Dropdown(choices, value=default, label='class (type to search)', filterable=True)
    idx = gr.Number(value=default, precision=0, label=f'class index (0..{engine.var.num_classes - 1})')
    if engine.names:
        pick.input(lambda v: v, pick, idx, api_visibility='private')
        idx.input(lambda v: v if isinstance(v, (int, float)) and 0 <= v < len(engine.names) else None, idx, pick,
                  api_visibility='private')
    return idx


def _schedule_inputs(gr, engine: Engine, left: int, right: int, suffix: str = '', tol_value: float = 0):
    il = gr.Slider(0, 30, value=left, step=1, label=f'iter_left{suffix}: implicit iterations at the first scale',
                   visible=engine.implicit)
    ir = gr.Slider(0, 30, value=right, step=1, label=f'iter_right{suffix}: at the last scale (linear between)',
                   visible=engine.implicit)
    tol = gr.Number(value=tol_value, label=f'iter_tol{suffix}: early exit once the relative residual of a scale is '
                    'below this (0: off)', visible=engine.implicit)
    pn = gr.Textbox(value=schedule_name(engine.var.patch_nums) if engine.flex else '',
                    label=f'FlexVAR schedule{suffix} (token-map sides, e.g. 1_2_3_4_5_6_8_10_13_16)',
                    visible=engine.flex)
    return il, ir, tol, pn


def build_ui(engine: Engine):
    gr = import_gradio()
    edit_defaults = _edit_defaults()
    d = engine.defaults
    default_class = 207 if engine.var.num_classes == 1000 else 0
    with gr.Blocks(title='VIAR', analytics_enabled=False) as demo:
        gr.Markdown(f'## VIAR: visual implicit autoregressive modeling\n{engine.describe()}. Calls run one at a time.')
        with gr.Tab('Generate'):
            with gr.Row():
                with gr.Column(scale=2):
                    g_class = _class_inputs(gr, engine, default_class)
                    with gr.Row():
                        g_seed = gr.Number(value=0, precision=0, label='first seed')
                        g_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label='images (seeds first..first+n-1)')
                    g_cfg = gr.Slider(0, 10, value=d.cfg, step=0.1, label='cfg (classifier-free guidance)')
                    g_il, g_ir, g_tol, g_pn = _schedule_inputs(gr, engine, d.iter_left, d.iter_right, '',
                                                               d.iter_tol or 0)
                    with gr.Accordion('top-k, top-p, more_smooth', open=False):
                        g_topk = gr.Number(value=d.top_k, precision=0, label='top_k (0: off)')
                        g_topp = gr.Slider(0, 1, value=d.top_p, step=0.01, label='top_p (0: off)')
                        g_smooth = gr.Checkbox(value=bool(d.more_smooth),
                                               label='more_smooth (gumbel-softmax mixture of codes)')
                    with gr.Accordion('side by side: the same seeds under a second schedule B', open=False,
                                      visible=engine.implicit or engine.flex):
                        g_cmp = gr.Checkbox(value=False, label='draw schedule B too')
                        g_il_b, g_ir_b, g_tol_b, g_pn_b = _schedule_inputs(gr, engine, 1, 1, ' (B)')
                    g_btn = gr.Button('Generate', variant='primary', elem_id='generate-btn')
                with gr.Column(scale=3):
                    g_img_a = gr.Image(label='schedule A', format='png', type='numpy', interactive=False,
                                       elem_id='images-a', elem_classes='pixels', height=200)
                    g_img_b = gr.Image(label='schedule B (side by side)', format='png', type='numpy',
                                       interactive=False, elem_classes='pixels', height=200)
                    g_info = gr.Markdown(label='report', elem_id='generate-info')
                    g_plot = gr.Image(label='fixed-point residual and iterations per scale', format='png',
                                      type='pil', interactive=False, show_label=False, elem_id='residual-plot')
            g_btn.click(on_page(engine.generate),
                        [g_class, g_seed, g_cfg, g_il, g_ir, g_n, g_topk, g_topp, g_smooth, g_tol, g_pn, g_cmp,
                         g_il_b, g_ir_b, g_tol_b, g_pn_b], [g_img_a, g_img_b, g_info, g_plot], api_name='generate',
                        api_description='Images of a class: (class_label, seed, cfg, iter_left, iter_right, '
                        'n_images, ...) -> (grid of the images, schedule B grid, report, residual plot)')
        with gr.Tab('Edit'):
            with gr.Row():
                with gr.Column(scale=2):
                    e_editor = gr.ImageEditor(label='image: upload, then paint the region to edit with the brush',
                                              type='pil', sources=('upload', 'clipboard'), layers=False,
                                              brush=gr.Brush(colors=['#ffffff'], color_mode='fixed'), height=360)
                    if engine.val_images:
                        e_val = gr.Dropdown([(os.path.relpath(p, os.path.dirname(os.path.dirname(os.path.dirname(p))))
                                              , p) for p in engine.val_images], value=None,
                                            label="or pick a validation image of the demo's data")
                        e_val.input(on_page(lambda p: load_image(p, 'the validation image')), e_val, e_editor,
                                    api_visibility='private')       # the pixels: gradio serves no outside path
                    e_box = gr.Textbox(value='', label='or a box y0,x0,y1,x1 (fractions of the side), e.g. 0,0.5,1,1',
                                       placeholder='0.25,0.25,0.75,0.75')
                    e_mode = gr.Radio(list(EDIT_MODES), value='in-paint', label='what to do with the region',
                                      info='out-paint keeps the region and draws the rest')
                    e_class = _class_inputs(gr, engine, default_class)
                    with gr.Row():
                        e_seed = gr.Number(value=0, precision=0, label='first seed')
                        e_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label='results')
                    e_cfg = gr.Slider(0, 10, value=edit_defaults['cfg'], step=0.1, label='cfg')
                    e_il, e_ir, e_tol, _ = _schedule_inputs(gr, engine, d.iter_left, d.iter_right, '',
                                                            d.iter_tol or 0)
                    with gr.Accordion('top-k, top-p, more_smooth', open=False):
                        e_topk = gr.Number(value=edit_defaults['top_k'], precision=0, label='top_k (0: off)')
                        e_topp = gr.Slider(0, 1, value=edit_defaults['top_p'], step=0.01, label='top_p (0: off)')
                        e_smooth = gr.Checkbox(value=edit_defaults['more_smooth'], label='more_smooth')
                    e_btn = gr.Button('Edit', variant='primary', elem_id='edit-btn')
                with gr.Column(scale=3):
                    e_out = gr.Image(label='results', format='png', type='numpy', interactive=False,
                                     elem_id='edit-results', elem_classes='pixels', height=260)
                    with gr.Row():
                        e_orig = gr.Image(label='original (model resolution)', format='png', type='numpy',
                                          interactive=False, elem_classes='pixels', height=180)
                        e_masked = gr.Image(label='masked input (hatched: generated)', format='png', type='numpy',
                                            interactive=False, elem_classes='pixels', height=180)
                    e_info = gr.Markdown(label='report')
            settings = [e_class, e_seed, e_cfg, e_il, e_ir, e_n, e_topk, e_topp, e_smooth, e_tol]
            outputs = [e_out, e_orig, e_masked, e_info]

            def edit_from_editor(value, box, mode, *rest):
                image, mask = editor_inputs(value)
                return engine.edit(image, mask, box, mode, *rest)
            e_btn.click(on_page(edit_from_editor), [e_editor, e_box, e_mode, *settings], outputs,
                        api_visibility='private')
            # the API endpoint: an image file and an optional mask file instead of the editor's layers (files, read
            # by the app itself: an unreadable one is a message naming it)
            a_img = gr.File(type='filepath', visible=False, label='image')
            a_mask = gr.File(type='filepath', visible=False, label='mask (white: the region)')
            gr.Button(visible=False).click(
                on_page(engine.edit), [a_img, a_mask, e_box, e_mode, *settings], outputs, api_name='edit',
                api_description='Zero-shot editing: (image, mask or None, box "y0,x0,y1,x1" or "", mode, class_label, '
                'seed, cfg, iter_left, iter_right, n_images, ...) -> (results grid, original, masked input, report)')
    return demo


def _edit_defaults() -> dict[str, Any]:
    """``scripts/edit.py``'s sampler defaults (the official notebook's editing call)."""
    from scripts.edit import get_parser as edit_parser
    p = edit_parser()
    return {k: p.get_default(k) for k in ('cfg', 'top_k', 'top_p', 'more_smooth')}


def serve(args: argparse.Namespace) -> None:
    import_gradio()     # before the model loads: a missing gradio is one line at once
    engine = load_engine(args)
    print(f'[app] {engine.describe()}'.replace('`', ''), flush=True)
    demo = build_ui(engine)
    demo.queue(default_concurrency_limit=1)         # one call at a time: a CPU has no room for two
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, ssr_mode=False,
                    show_error=True)
    except OSError as e:        # e.g. the port is taken; gradio's sentence without its advice about launch()
        port = args.port or os.environ.get('GRADIO_SERVER_PORT') or 7860
        raise AppError(f'cannot serve on port {port} ({one_line(e).split(". ")[0]}): pass another --port (or stop '
                       f'what uses it)') from e


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    return run_cli(lambda: serve(args), PROG, interrupted='stopped')


if __name__ == '__main__':
    raise SystemExit(main())
