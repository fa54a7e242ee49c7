"""Samples the 50,000 class-conditional images of the FID protocol (50 per ImageNet class) and packs them in an npz.

    python sampling.py --cfg 1.5 --depth 30 --sample_dir samples --use_implicit True --iter_left 10 --iter_right 10
        # the published VIAR-d30 and its tokenizer (the defaults; bash scripts/eval.sh runs this)
    torchrun --nproc_per_node=8 sampling.py ...            # same flags, same images, 8x faster

writes ``samples/implicit-<checkpoint file>-cfg-1.5-seed-1/000000.png ... 049999.png`` and the ``.npz`` next to the
folder (key ``arr_0``) for ``evaluator.py``.  The images of class ``c`` are drawn in batches of ``--batch_size``;
batch ``i`` uses ``g_seed = seed + i`` (the official layout), so they do not depend on the number of processes.
Rerunning the same command resumes; ``sampling_config.json`` records the settings and the weights' fingerprints, and a
folder sampled with other settings or weights is refused.  FlexVAR checkpoints take ``--infer_pn``, ``--max_pn``,
``--used_llamagen_cfg``.  The work is ``utils.folder_sampling.sample_folder``, which Python code can call directly.
Details: docs/sampling_evaluation.md ("Sampling 50,000 images for FID").
"""
import argparse
import contextlib
import math
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch

from models.checkpoint import describe_classes
from utils import dist
from utils.download import resolve_default
from utils.errors import Preempted, run_cli
from utils.folder_sampling import checkpoint_identity, hub_identity, sample_folder
from utils.folder_sampling import folder_name as _folder_name
from utils.sampling_utils import (
    SEED_MAX,
    SamplerSettings,
    SamplingError,
    add_common_args,
    check_args,
    check_output_dir,
    guard_writes,
    load_models,
    pretrained_name,
    sampler_kwargs,
    setup_device,
)
from utils.zoo import VIAR_MODEL, default_path

PROG = 'sampling.py'


def folder_name(args, ckpt_depth: int, kw: dict[str, Any] | None = None) -> str:
    """The sample folder of the flags ``args`` (``utils.folder_sampling.folder_name``): named after ``--ckpt_path``,
    or the ``--pretrained`` folder or repository."""
    kw = {**sampler_kwargs(args), 'cfg': args.cfg, **(kw or {})}
    return _folder_name(model_label(args), ckpt_depth, bool(args.use_implicit), args.seed, kw)


def model_label(args) -> str:
    return pretrained_name(args.pretrained) if getattr(args, 'pretrained', None) else os.path.basename(args.ckpt_path)


def identity(args) -> tuple[dict[str, Any], dict[str, tuple[str, str, str]]]:
    """(names recorded with the settings, fingerprints of the weights) of the flags: the checkpoint files, or the
    hub folder's ``model.safetensors``."""
    if getattr(args, 'pretrained', None):
        return hub_identity(args.pretrained, args.pretrained_weights)
    return checkpoint_identity(args.ckpt_path, args.vae_ckpt)


# ================================ main ================================================================================
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt_path', type=str, default=default_path(VIAR_MODEL), help='VAR, VIAR or FlexVAR checkpoint')
    p.add_argument('--sample_dir', type=str, default='samples', help='parent folder of the sample folder and npz')
    p.add_argument('--seed', type=int, default=1, help='batch i of every class uses g_seed = seed + i')
    p.add_argument('--num_classes', type=int, default=1000, help='sample classes 0 .. num_classes-1')
    p.add_argument('--per_class', type=int, default=50, help='images per class')
    p.add_argument('--batch_size', type=int, default=25,
                   help='images per sampler call (a unit of work; changes the images)')
    add_common_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def check_sampling_args(args: argparse.Namespace) -> None:
    """Every flag, before anything is loaded or written."""
    check_args(args)
    last_g_seed = args.seed + math.ceil(args.per_class / args.batch_size) - 1
    if last_g_seed > SEED_MAX:
        raise SamplingError(f'--seed {args.seed} is too large: the last batch of a class would use g_seed '
                            f'{last_g_seed} > 2**64 - 1')
    check_output_dir(args.sample_dir, '--sample_dir')


def main(argv: Sequence[str] | None = None) -> int:
    """``python sampling.py ARGV``: samples (``sample``); the exit status (1 after one error line, 130 Ctrl-C)."""
    return run_cli(lambda: sample(parse_args(argv)), PROG,
                   interrupted='interrupted; every image written so far is kept: rerun the same command to resume')


def sample(args: argparse.Namespace) -> None:
    check_sampling_args(args)
    args.ckpt_path = resolve_default(args.ckpt_path)        # ckpts/<published file>: the repository's, from anywhere
    device, amp_dtype = setup_device(args)
    with stop_on_sigterm(), guard_writes('every image written so far is kept: fix this and rerun the same command to '
                                         'resume', every_rank=True):     # disk full, permissions ...: this rank's own
        _sample(args, device, amp_dtype)


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM (a scheduler's preemption) stops the sampling with one line (``run_cli``: status 143) saying that
    the images written so far are kept and that the same command resumes; the previous handler is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Preempted('SIGTERM: every image written so far is kept; rerun the same command to resume')
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sample(args: argparse.Namespace, device: torch.device, amp_dtype) -> None:
    torch.manual_seed(args.seed)        # as the official script (the images only depend on g_seed)
    # models (architecture read from the files; --depth / --use_implicit are checked against them)
    vae, var = load_models(args, device, args.ckpt_path)
    source = args.pretrained if getattr(args, 'pretrained', None) else args.ckpt_path
    if args.num_classes > var.num_classes:
        raise SamplingError(f'--num_classes {args.num_classes} but {source!r} has {var.num_classes} classes: '
                            f'pass --num_classes {var.num_classes} or fewer')
    kw = sampler_kwargs(args, var)
    if dist.is_master() and getattr(var, 'class_names', None):
        print(f'[sampling] classes of {source}: {describe_classes(var.class_names[:args.num_classes])}', flush=True)
    names, weights = identity(args) if dist.is_master() else (None, None)     # rank 0 records them
    sample_folder(vae, var, os.path.join(args.sample_dir, folder_name(args, var.depth, kw)), args.num_classes,
                  args.per_class, args.seed, batch_size=args.batch_size, amp_dtype=amp_dtype, names=names,
                  weights=weights, settings=SamplerSettings.from_namespace(args))


if __name__ == '__main__':
    raise SystemExit(main())
