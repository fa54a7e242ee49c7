"""What the sampling scripts share (``sampling.py``, ``gen_img.py``, ``scripts/edit.py`` ...).  A script is built from
these pieces, in this order:

    p = argparse.ArgumentParser(...); <its own flags>; add_common_args(p)   # or the groups one by one
    check_args(args)                           # every flag checked before anything is loaded or written
    device, amp_dtype = setup_device(args)     # torchrun group, the official backend flags, the autocast dtype
    vae, var = load_models(args, device, ckpt) # missing published files downloaded, --depth/--use_implicit checked
    kw = sampler_kwargs(args, var)             # autoregressive_infer_cfg's keyword arguments from the flags
    img_B3HW = sample_batch(var, label_B, g_seed, kw, amp_dtype)    # add keys to kw for more (edit_mask=...)

FlexVAR checkpoints go through the same pieces.  A new sampler flag is a parser line and a field of
``SamplerSettings`` (``utils.sampler_settings``).  Every user-fixable problem is a ``SamplingError`` (a
``UserError``).  This module loads models; nothing under ``models/`` imports it.
"""
import argparse
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from models.checkpoint import is_flexvar_state, load_vae_var, model_state_dict, read_checkpoint
from models.errors import ModelError
from models.flexvar import FlexVAR
from utils import dist
from utils.download import ensure_checkpoint, resolve_default
from utils.errors import UserError
from utils.flags import BOOL, FLEX_SCHEDULE_PRESETS
from utils.misc import DiskFullError
from utils.model_io import model_errors
from utils.sampler_settings import (
    ITER_EXITS,
    ITER_SOLVERS,
    SamplerSettings,
    SettingsError,
    _at_least,
    schedule_name,
)
from utils.zoo import FLEX_TOKENIZER, MODELS, VAR_TOKENIZER, VIAR_MODEL, default_path, var_file

__all__ = ['BOOL', 'FLAG_RULES', 'FLEX_KWARGS', 'FLEX_SCHEDULE_PRESETS', 'ITERATION_KWARGS', 'SAMPLER_FLAGS',
           'SamplerSettings', 'SamplingError', 'add_common_args', 'add_device_args', 'add_flex_args',
           'add_guidance_args', 'add_model_args', 'add_sampler_args', 'autocast', 'cast_weights', 'check_args',
           'cpu_has_native_bf16', 'check_output_dir', 'default_vae_ckpt', 'default_var_ckpt', 'dtype_name',
           'add_var_ckpt_arg', 'load_chosen', 'load_measured', 'effective_top_k', 'guard_writes', 'load_models',
           'load_pretrained', 'make_output_dir',
           'parse_tolerance', 'pretrained_name', 'resolve_dtype', 'sample_batch', 'sampler_kwargs', 'schedule_name',
           'setup_backends', 'setup_device', 'to_uint8', 'weights_sha256']

class SamplingError(UserError):
    """A user-caused problem (bad flag, folder of other settings or weights); the message says what to do."""


# ================================ flags ===============================================================================
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The tokenizer (or a hub folder holding both models), and the architecture the user states (checked against
    the checkpoint, never trusted)."""
    p.add_argument('--pretrained', type=str, default=None, metavar='DIR_OR_REPO',
                   help='a hub folder (models.save_pretrained, python -m scripts.convert) or a Hugging Face repository '
                        'id holding one: tokenizer and transformer, instead of the checkpoint files')
    p.add_argument('--vae_ckpt', type=str, default=None,
                   help=f'tokenizer checkpoint (default: {default_path(VAR_TOKENIZER)}, or '
                        f'{default_path(FLEX_TOKENIZER)} for a FlexVAR model)')
    p.add_argument('--depth', type=int, default=None,
                   help='depth the checkpoint is expected to have (checked against the file; the architecture is '
                        'always read from the checkpoint)')
    p.add_argument('--use_implicit', default=None, help='whether the checkpoint is VIAR (default: as the file says; '
                   'True / False are checked against the file)', **BOOL)
    p.add_argument('--pre_depth', type=int, default=None, help='VIAR pre blocks expected (checked; default: any)')
    p.add_argument('--post_depth', type=int, default=None, help='VIAR post blocks expected (checked; default: any)')


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The knobs of ``autoregressive_infer_cfg`` (see ``SAMPLER_FLAGS``)."""
    add_guidance_args(p)
    p.add_argument('--more_smooth', default=False, help='gumbel-softmax mixture of codes (visualisation, not for FID)',
                   **BOOL)
    p.add_argument('--iter_left', type=int, default=10, help='VIAR: implicit iterations at the first scale')
    p.add_argument('--iter_right', type=int, default=10,
                   help='VIAR: implicit iterations at the last scale (linear between)')
    p.add_argument('--iter_tol', type=float, default=None,
                   help='VIAR early exit: a scale stops iterating after iteration i >= 1 once the relative residual '
                        '|z_i - z_(i-1)| / |z_i| of every row of the batch is <= this; --iter_left/--iter_right then '
                        "give each scale's maximum (default: off, the fixed schedule)")
    p.add_argument('--iter_exit', choices=ITER_EXITS, default=None,
                   help="VIAR early exit: 'batch' (default; the scale stops when every row is below --iter_tol) or "
                        "'row' (each image stops on its own residual, the others iterate on)")
    p.add_argument('--iter_solver', choices=ITER_SOLVERS, default=None,
                   help="VIAR fixed-point solver: 'picard' (default; the paper's z <- f(z)) or 'anderson' (Anderson "
                        "acceleration, --anderson_m, --anderson_beta)")
    p.add_argument('--anderson_m', type=int, default=None, help='Anderson memory (default 5)')
    p.add_argument('--anderson_beta', type=float, default=None, help='Anderson damping in (0, 1] (default 1)')
    p.add_argument('--warm_start', default=None, help="VIAR: each scale's iteration starts from the previous scale's "
                   'fixed point, upsampled (default off: from the input injection u)', **BOOL)


def add_flex_args(p: argparse.ArgumentParser) -> None:
    """FlexVAR's sampling knobs (``FlexVAR.autoregressive_infer_cfg``); refused for a VAR/VIAR model.  Their defaults,
    applied for a FlexVAR model only (``FLEX_KWARGS``), are the official ``eval_c2i.py``'s; a flag not given is absent
    from the namespace (read them with ``getattr(args, flag, None)``)."""
    g = p.add_argument_group('FlexVAR (checkpoints of github jiaosiyu1999/FlexVAR or train.py --flex)')
    unset = argparse.SUPPRESS
    g.add_argument('--infer_pn', '--infer_patch_nums', dest='infer_pn', type=str, default=unset, metavar='SCHEDULE',
                   help="token-map sides, strictly increasing from 1, e.g. 1_2_3_4_5_6_8_10_13_16 (alias '256': 10 "
                        "steps, 256 px) or 1_2_3_4_5_6_7_8_9_10_12_14_16_23_32 (alias '512': the official 512 px "
                        "zero-shot schedule); image side = the tokenizer's downsampling (16) x the last side. Default: "
                        "the model's own schedule: the scales a train.py --flex checkpoint was trained on (its --pn), "
                        "'256' for the published checkpoints")
    g.add_argument('--max_pn', '--maxpn', dest='max_pn', type=int, default=unset,
                   help='scales with a larger side use the full --cfg and greedy (top-1) draws (default 16)')
    g.add_argument('--used_llamagen_cfg', default=unset, help="LlamaGen's guidance u + (c - u) cfg at every scale "
                   "instead of VAR's ramp (default off)", **BOOL)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', type=str, default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--dtype', type=str, default='auto', choices=['auto', 'fp32', 'fp16', 'bf16'],
                   help='autocast precision; auto = the official behaviour (fp16 on CUDA, fp32 on CPU)')
    p.add_argument('--tf32', default=True, help='allow TF32 matmuls/convolutions on CUDA (official: on)', **BOOL)
    p.add_argument('--cast_weights', default=True, help='fp16/bf16: cast the weights of the linear layers to that '
                   'dtype once, after loading (VAR.cast_for_inference), instead of at every call as plain autocast '
                   'does: the same images, faster', **BOOL)


def add_guidance_args(p) -> None:
    """``--cfg``, ``--top_k`` and ``--top_p`` with the sampling scripts' defaults: part of ``add_sampler_args``, and
    alone the knobs of the scripts that measure the sampler (``scripts.sweep``, ``scripts.fixed_point``).  ``p``: a
    parser or an argument group."""
    p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance (ramped linearly over scales)')
    p.add_argument('--top_k', type=int, default=900, help='top-k filtering (0: off; clamped to the vocabulary size)')
    p.add_argument('--top_p', type=float, default=0.96, help='top-p filtering, in [0, 1] (0: off)')


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags of every sampling script: model, sampler knobs (FlexVAR's too), device and precision."""
    add_model_args(p)
    add_sampler_args(p)
    add_flex_args(p)
    add_device_args(p)


# the tables of the sampler flags, derived from SamplerSettings (utils.sampler_settings: a new knob is one field there)
# flag -> keyword argument of autoregressive_infer_cfg; a flag the namespace lacks, or that is None, is not passed
SAMPLER_FLAGS: dict[str, str] = SamplerSettings.flags()
# keywords that only change the pixels of a model with an implicit block (VIAR)
ITERATION_KWARGS = SamplerSettings.names_of('iteration')
# keywords only a FlexVAR model takes, and their defaults for one (official eval_c2i.py: --maxpn 16, VAR's guidance
# ramp; the schedule, None here: the model's own, var.patch_nums -- the --pn a train.py --flex checkpoint was trained
# on, 1_2_3_4_5_6_8_10_13_16 for the published files; see models.checkpoint.trained_schedule)
FLEX_KWARGS = SamplerSettings.flex_defaults()

SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1      # what torch.Generator.manual_seed accepts


# flag -> (test of one value, what a valid value is); list flags are tested element by element, None is skipped
FLAG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **SamplerSettings.rules(),
    'num_classes': (_at_least(1), 'must be >= 1'),
    'per_class': (_at_least(1), 'must be >= 1'),
    'batch_size': (_at_least(1), 'must be >= 1'),
    'nrow': (_at_least(1), 'must be >= 1 (images per grid row)'),
    'class_label': (lambda v: not str(v).strip().lstrip('-').isdigit() or int(v) >= 0,
                    'must be >= 0 (class indices; or class names of a train.py checkpoint)'),
    'seed': (lambda v: SEED_MIN <= v <= SEED_MAX, 'must be in [-2**63, 2**64 - 1]'),
    'seeds': (lambda v: SEED_MIN <= v <= SEED_MAX, 'must be in [-2**63, 2**64 - 1]'),
}


def check_args(args: argparse.Namespace) -> None:
    """Tests every flag of ``args`` that ``FLAG_RULES`` knows; raises one ``SamplingError`` naming each bad flag.
    Reads nothing and writes nothing: call it first, before models load or folders are made."""
    bad = []
    for flag, (ok, rule) in FLAG_RULES.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        wrong = [v for v in values if not ok(v)]
        if wrong:
            bad.append(f'--{flag} {" ".join(map(str, wrong))} {rule}')
    if bad:
        raise SamplingError('; '.join(bad))


def check_output_dir(path: str, flag: str) -> None:
    """An output folder that exists as something else (a file) is refused before anything is computed."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SamplingError(f'{flag} {path!r} is a file, not a folder: pass another {flag}')


def parse_tolerance(text: str, flag: str, error: type[UserError] = SamplingError, hint: str = '') -> float:
    """One early-exit tolerance given in ``flag`` (an element of a list flag): a finite number >= 0, the rule of
    ``--iter_tol`` (``FLAG_RULES``); else one ``error`` line (``hint`` ends the one for what is no number)."""
    try:
        tol = float(text)
    except ValueError as e:
        raise error(f'could not read the tolerance {text!r} of {flag}{hint}') from e
    ok, rule = FLAG_RULES['iter_tol']
    if not ok(tol):
        raise error(f'{flag} {text} {rule}')
    return tol


# ================================ device, precision, models ===========================================================
def setup_backends(tf32: bool) -> None:
    """The official flags: TF32 on, deterministic cuDNN without autotuning."""
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``--dtype``, or None for plain fp32 ('auto': fp16 on CUDA as the official scripts, else
    fp32)."""
    if name == 'auto':
        name = 'fp16' if device.type == 'cuda' else 'fp32'
    return {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[name]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The autocast context of ``amp_dtype`` on ``device`` (None: disabled, plain fp32)."""
    return torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def dtype_name(amp_dtype: torch.dtype | None) -> str:
    return {None: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}[amp_dtype]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN finds bf16 instructions (avx512_bf16 / AMX) on this CPU; without them bf16 matmuls are
    emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


SLOW_BF16_NOTE = ('note: this CPU has no native bf16 matmul (avx512_bf16 / AMX): bf16 runs emulated, slower than '
                  'fp32 (use --dtype fp32)')


def setup_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """Joins the torchrun group (if launched by it), sets the backend flags of ``--tf32`` and returns (this rank's
    device, autocast dtype of ``--dtype``); says once when bf16 on this CPU would be emulated.  Call
    ``utils.dist.destroy()`` when done."""
    device = dist.init_distributed(args.device)
    setup_backends(args.tf32)
    amp_dtype = resolve_dtype(args.dtype, device)
    if device.type == 'cpu' and amp_dtype == torch.bfloat16 and not cpu_has_native_bf16() and dist.is_master():
        print(SLOW_BF16_NOTE, flush=True)
    return device, amp_dtype


def default_var_ckpt(args: argparse.Namespace, depth: int) -> str:
    """The model when ``--var_ckpt`` is not given: the published VIAR with ``--use_implicit``, else the published
    VAR of ``--depth`` (``depth`` when ``--depth`` is not given either), at their default place ``ckpts/``."""
    return default_path(VIAR_MODEL if args.use_implicit else var_file(args.depth or depth))


def make_output_dir(path: str, error: type[UserError] = SamplingError) -> None:
    """Creates the folder ``path`` the images go to (under ``--output_dir``); a failure is one ``error`` line."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise error(f'cannot create the output folder {path} ({e}): pass another --output_dir') from e


@contextlib.contextmanager
def guard_writes(kept: str, every_rank: bool = False) -> Iterator[None]:
    """Around a script's work once ``setup_device`` has joined the torchrun group: an OSError (disk full, an output
    folder that is a file, permissions ...) becomes one ``SamplingError`` line ``'{e}; {kept}'`` (``every_rank``:
    this rank's own problem), and the group is left in any case."""
    ok = False
    try:
        yield
        ok = True
    except (OSError, DiskFullError) as e:      # DiskFullError: one line naming the file and the free space
        raise SamplingError(f'{e}; {kept}', every_rank=every_rank) from e
    finally:
        dist.destroy(sync=ok)       # a barrier only when every rank got here the same way


def default_vae_ckpt(var_ckpt: str) -> str:
    """The tokenizer ``var_ckpt`` needs when ``--vae_ckpt`` is not given, at its default place: FlexVAR's for a
    FlexVAR model (read from the file's keys; for a published file not downloaded yet, from the registry), else
    VAR's."""
    entry = MODELS.get(os.path.basename(var_ckpt))
    flex = entry is not None and entry.tokenizer == FLEX_TOKENIZER
    if os.path.isfile(var_ckpt):
        try:
            flex = is_flexvar_state(model_state_dict(read_checkpoint(var_ckpt, 'model checkpoint'), var_ckpt))
        except ModelError:
            pass        # load_vae_var reports what is wrong with the file
    return default_path(FLEX_TOKENIZER if flex else VAR_TOKENIZER)


def load_models(args: argparse.Namespace, device: torch.device, var_ckpt: str):
    """(tokenizer, transformer) of ``args.vae_ckpt`` and ``var_ckpt``: missing published checkpoints at their default
    place are downloaded (a mistyped path of either fails before any download starts), the architecture is read from
    the file and checked against ``--depth / --use_implicit / --pre_depth / --post_depth``.  ``args.vae_ckpt`` None:
    the tokenizer of the model's kind (``default_vae_ckpt``; set in ``args``).  FlexVAR's flags on a VAR/VIAR model
    are refused.  With ``--pretrained`` both models come from that hub folder or repository (``load_pretrained``).
    Under fp16/bf16 the transformer's weights are cast once (``cast_weights``).  ``ckpts/<published file>`` is the
    repository's ``ckpts/`` when the working directory has none (``utils.download.resolve_default``)."""
    if getattr(args, 'pretrained', None):
        vae, var = load_pretrained(args, device)
        return vae, cast_weights(var, args, resolve_dtype(getattr(args, 'dtype', 'auto'), device))
    var_ckpt = resolve_default(var_ckpt)        # ckpts/<published file>: the repository's, from anywhere
    ensure_checkpoint(var_ckpt, 'model checkpoint', download=False)
    if args.vae_ckpt is None:
        args.vae_ckpt = default_vae_ckpt(var_ckpt)
    args.vae_ckpt = resolve_default(args.vae_ckpt)
    for download in (False, True):
        ensure_checkpoint(var_ckpt, 'model checkpoint', download=download)
        ensure_checkpoint(args.vae_ckpt, 'tokenizer checkpoint', download=download)
    with model_errors(_flags(args)):
        vae, var = load_vae_var(args.vae_ckpt, var_ckpt, device=device, expect=_expected(args))
    _refuse_flex_flags(args, var, repr(var_ckpt))
    args.use_implicit = bool(var.backbone.is_implicit)     # not given: as the file says
    return vae, cast_weights(var, args, resolve_dtype(getattr(args, 'dtype', 'auto'), device))


def _expected(args) -> dict[str, Any]:
    """The architecture the flags state (None: not stated; ``--use_implicit`` absent means VAR unless the script's
    default is None)."""
    implicit = getattr(args, 'use_implicit', False)
    return {'depth': getattr(args, 'depth', None), 'use_implicit': None if implicit is None else bool(implicit),
            'pre_depth': getattr(args, 'pre_depth', None), 'post_depth': getattr(args, 'post_depth', None)}


def _flags(args) -> dict[str, str]:
    return {k: f'--{k}' for k in _expected(args)}


def _refuse_flex_flags(args, var, source: str) -> None:
    given = [f'--{flag}' for flag, name in SAMPLER_FLAGS.items()
             if name in FLEX_KWARGS and getattr(args, flag, None) is not None]
    if given and not isinstance(var, FlexVAR):
        raise SamplingError(f'{" ".join(given)} {"is a FlexVAR flag" if len(given) == 1 else "are FlexVAR flags"}, but '
                            f'{source} holds {var.describe()}, whose scales are fixed: drop '
                            f'{"it" if len(given) == 1 else "them"}, or pass a FlexVAR checkpoint')


def pretrained_name(source: str) -> str:
    """A hub folder's or repository's name (its last path component): what names its output folders."""
    return os.path.basename(os.path.normpath(source))


def load_pretrained(args: argparse.Namespace, device: torch.device, ckpt_flags: tuple[str, ...] = ('var_ckpt',)):
    """(tokenizer, transformer) of ``--pretrained`` (a hub folder or repository id), checked against ``--depth /
    --use_implicit / ...`` as a checkpoint is; ``--vae_ckpt`` (or a flag of ``ckpt_flags``) given as well is refused.
    Sets ``args.pretrained_dir`` (the local folder: its ``model.safetensors`` fingerprints the weights)."""
    from models.checkpoint import check_expected
    from models.hub import WEIGHTS, from_pretrained, read_hub_config, resolve_pretrained
    both = [f'--{f}' for f in ('vae_ckpt', *ckpt_flags) if getattr(args, f, None) is not None]
    if both:
        raise SamplingError(f'--pretrained {args.pretrained} holds the tokenizer and the transformer: drop '
                            f'{" and ".join(both)}')
    with model_errors(_flags(args)):
        folder = resolve_pretrained(args.pretrained)
        check_expected(read_hub_config(folder)['transformer'], _expected(args), args.pretrained)
        vae, var = from_pretrained(folder, device=device)
    _refuse_flex_flags(args, var, f'--pretrained {args.pretrained!r}')
    args.pretrained_dir, args.pretrained_weights = folder, os.path.join(folder, WEIGHTS)
    args.use_implicit = bool(var.backbone.is_implicit)     # not given: as the folder says
    return vae, var


def load_measured(source: str, hub: bool, vae_ckpt: str | None, args: argparse.Namespace, device: torch.device):
    """(tokenizer, transformer) of the scripts that measure the sampler (``scripts.sweep``, ``scripts.fixed_point``):
    the hub folder or repository ``source`` (``hub``) or the checkpoint files ``vae_ckpt`` + ``source``; under
    fp16/bf16 the transformer's weights cast once (``--cast_weights``, ``--dtype``)."""
    from models.hub import from_pretrained
    with model_errors():
        vae, var = from_pretrained(source, device=device) if hub else load_vae_var(vae_ckpt, source, device=device)
    return vae, cast_weights(var, args, resolve_dtype(args.dtype, device))


def load_chosen(args: argparse.Namespace, device: torch.device, depth: int):
    """(tokenizer, transformer, source, name) of the image scripts (``gen_img.py``, ``scripts/edit.py``): the model
    of ``--pretrained`` or ``--var_ckpt`` (default ``default_var_ckpt(args, depth)``, set in ``args``), its classes
    ``--class_label`` resolved (when given), ``source`` as messages name it and ``name`` the output sub-folder."""
    from models.checkpoint import resolve_class_labels
    if args.var_ckpt is None and not args.pretrained:
        args.var_ckpt = default_var_ckpt(args, depth)
    vae, var = load_models(args, device, args.var_ckpt)
    source = args.pretrained or args.var_ckpt
    if args.class_label is not None:
        with model_errors():
            args.class_label = resolve_class_labels(args.class_label, getattr(var, 'class_names', None),
                                                    var.num_classes, what='--class_label', path=repr(source))
    name = pretrained_name(args.pretrained) if args.pretrained else os.path.splitext(os.path.basename(args.var_ckpt))[0]
    return vae, var, source, name


def add_var_ckpt_arg(p: argparse.ArgumentParser, what: str, depth_note: str) -> None:
    """``--var_ckpt`` of the image scripts (``load_chosen``); ``depth_note`` says which depth without --depth."""
    p.add_argument('--var_ckpt', type=str, default=None, help=f'{what} checkpoint (default: {default_path(VIAR_MODEL)} '
                   f'with --use_implicit, else {default_path(var_file("{depth}"))}{depth_note})')


def cast_weights(var, args: argparse.Namespace, amp_dtype: torch.dtype | None):
    """``--cast_weights`` (default on) under fp16/bf16: the transformer's linear weights cast once to the autocast
    dtype (``VAR.cast_for_inference``; bit-identical images).  Returns ``var``."""
    if amp_dtype is not None and getattr(args, 'cast_weights', True):
        var.cast_for_inference(amp_dtype)
    return var


HASH_CHUNK = 8 << 20


def _sha256_cache_path() -> str:
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(cache, 'viar', 'weights_sha256.json')


def weights_sha256(path: str) -> str:
    """The hex sha256 of the whole file ``path`` (what identifies its weights: the same bytes under another name give
    the same one).  Hashing a 9 GB file takes a while, so the hash is cached (``$XDG_CACHE_HOME/viar/
    weights_sha256.json``, default ``~/.cache``) under the file's real path, size, modification and change times and
    inode: a file rewritten (trained further, copied over, replaced) is hashed again."""
    st = os.stat(path)
    key = f'{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}'
    cache_path = _sha256_cache_path()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    cache = {k: v for k, v in cache.items() if not k.startswith(os.path.realpath(path) + '|')}
    cache[key] = digest.hexdigest()
    try:
        from utils.misc import atomic_write_bytes
        atomic_write_bytes(json.dumps(cache, indent=0).encode(), cache_path, fsync=False)
    except (OSError, UserError):
        pass        # no cache: the next run hashes again
    return cache[key]


# ================================ sampling ============================================================================
def effective_top_k(top_k: int, V: int) -> int:
    """top-k larger than the vocabulary keeps every token (the official code would crash in ``topk``)."""
    return min(top_k, V) if top_k > 0 else top_k


def sampler_kwargs(args: argparse.Namespace, var=None) -> dict[str, Any]:
    """The keyword arguments of ``autoregressive_infer_cfg`` that the flags of ``args`` give
    (``SamplerSettings.from_namespace(args).kwargs(var)``: absent and None flags left out, ``--infer_pn`` as a tuple of
    sides).  With the model, ``top_k`` is clamped to its vocabulary (what it samples with, and what ``sampling.py``
    records), and a FlexVAR model gets every keyword of ``FLEX_KWARGS`` (the defaults where a flag is not given; the
    schedule: the model's own, ``var.patch_nums``, which ``load_models`` sets to the scales a training checkpoint was
    trained on), so that the settings recorded beside its images always name its schedule and guidance."""
    try:
        return SamplerSettings.from_namespace(args).kwargs(var)
    except SettingsError as e:
        raise SamplingError(str(e)) from e


@torch.inference_mode()
def sample_batch(var, label_B: torch.Tensor, g_seed: int, kw: dict[str, Any],
                 amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One ``autoregressive_infer_cfg(B=len(label_B), label_B=label_B, g_seed=g_seed, **kw)`` call under the chosen
    autocast, keyword arguments only (FlexVAR's third positional parameter is the schedule, VAR's is g_seed); images
    (B, 3, H, W) in [0, 1] in the dtype the model returns (fp16 under fp16 autocast, as the official code)."""
    dev = label_B.device
    with autocast(dev, amp_dtype):
        return var.autoregressive_infer_cfg(B=label_B.numel(), label_B=label_B, g_seed=g_seed, **kw)


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 exactly as the official scripts convert: ``x * 255`` in the image's own dtype, then
    truncation toward zero by ``astype(np.uint8)`` (no rounding)."""
    x_BHW3 = img_B3HW.permute(0, 2, 3, 1).mul(255)
    if x_BHW3.dtype == torch.bfloat16:      # numpy has no bfloat16; bf16 -> fp32 is exact
        x_BHW3 = x_BHW3.float()
    return x_BHW3.cpu().numpy().astype(np.uint8)
