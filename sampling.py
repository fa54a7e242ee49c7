"""Samples the 50,000 class-conditional images of the FID protocol (50 per ImageNet class) and packs them in an npz.

    python sampling.py --ckpt_path ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5 --depth 30 \\
        --sample_dir samples --use_implicit True --iter_left 10 --iter_right 10
    torchrun --nproc_per_node=8 sampling.py ...            # same flags, same images, 8x faster

writes ``samples/implicit-viar.pth-cfg-1.5-seed-1/000000.png ... 049999.png`` and
``samples/implicit-viar.pth-cfg-1.5-seed-1.npz`` (key ``arr_0``, uint8 (N, H, W, 3), index order) for
``evaluator.py``.  A VAR checkpoint (no ``--use_implicit``) goes to ``samples/d{depth}-{ckpt}-cfg-{cfg}-seed-{seed}/``.

Seeding (the official one): the images of class ``c`` are drawn in batches of ``--batch_size`` (25); batch ``i``
holds images ``c * per_class + i * batch_size + j`` and is sampled with ``g_seed = seed + i``.  With the defaults
this is exactly the official layout, so a published checkpoint gives the official images (on CUDA with the official
fp16 autocast).  When ``per_class`` is not a multiple of ``batch_size`` the last batch of a class is shorter and
uses the same rule (``g_seed = seed + i``).  A (class, batch) unit is the unit of work: units are dealt to the
``torchrun`` ranks round-robin, so the images do not depend on the number of processes.

Resuming: rerunning the same command skips every PNG that exists and decodes; a unit is sampled again only if one
of its PNGs is missing or broken, and then only those are written.  PNGs are written atomically (temporary file +
rename).  The settings that decide the pixels are recorded in ``<folder>/sampling_config.json``; resuming into a
folder sampled with other settings is refused.  Once every image exists, rank 0 packs the npz.
"""
import argparse
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.checkpoint import CheckpointError, load_vae_var
from utils import dist
from utils.arg_util import str2bool
from utils.download import MissingCheckpointError, ensure_checkpoint
from utils.misc import atomic_write_bytes, create_npz_from_sample_folder, png_is_valid

BOOL = dict(type=str2bool, nargs='?', const=True, metavar='BOOL')
CONFIG_NAME = 'sampling_config.json'


class SamplingError(RuntimeError):
    """A user-caused problem (bad flag, folder of other settings); the message says what to do."""


# ================================ helpers shared with gen_img.py ======================================================
def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags of both scripts: architecture statements, sampling knobs, device and precision."""
    p.add_argument('--vae_ckpt', type=str, default='ckpts/vae_ch160v4096z32.pth', help='tokenizer checkpoint')
    p.add_argument('--depth', type=int, default=None,
                   help='depth the checkpoint is expected to have (checked against the file; the architecture is '
                        'always read from the checkpoint)')
    p.add_argument('--use_implicit', default=False, help='the checkpoint is VIAR (checked against the file)', **BOOL)
    p.add_argument('--pre_depth', type=int, default=None, help='VIAR pre blocks expected (checked; default: any)')
    p.add_argument('--post_depth', type=int, default=None, help='VIAR post blocks expected (checked; default: any)')
    p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance (ramped linearly over scales)')
    p.add_argument('--top_k', type=int, default=900, help='top-k filtering (0: off; clamped to the vocabulary size)')
    p.add_argument('--top_p', type=float, default=0.96, help='top-p filtering (0: off)')
    p.add_argument('--more_smooth', default=False, help='gumbel-softmax mixture of codes (visualisation, not for FID)', **BOOL)
    p.add_argument('--iter_left', type=int, default=10, help='VIAR: implicit iterations at the first scale')
    p.add_argument('--iter_right', type=int, default=10, help='VIAR: implicit iterations at the last scale (linear between)')
    p.add_argument('--device', type=str, default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--dtype', type=str, default='auto', choices=['auto', 'fp32', 'fp16', 'bf16'],
                   help='autocast precision; auto = the official behaviour (fp16 on CUDA, fp32 on CPU)')
    p.add_argument('--tf32', default=True, help='allow TF32 matmuls/convolutions on CUDA (official: on)', **BOOL)


def setup_backends(tf32: bool) -> None:
    """The official flags: TF32 on, deterministic cuDNN without autotuning."""
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype, or None for plain fp32."""
    if name == 'auto':
        name = 'fp16' if device.type == 'cuda' else 'fp32'
    return {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[name]


def dtype_name(amp_dtype: Optional[torch.dtype]) -> str:
    return {None: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}[amp_dtype]


def load_models(args, device: torch.device, var_ckpt: str):
    """Tokenizer and transformer; fetches missing published checkpoints; checks the stated architecture."""
    for download in (False, True):      # a mistyped path fails before any download starts
        ensure_checkpoint(var_ckpt, 'model checkpoint', download=download)
        ensure_checkpoint(args.vae_ckpt, 'tokenizer checkpoint', download=download)
    expect = {'depth': args.depth, 'use_implicit': bool(args.use_implicit),
              'pre_depth': args.pre_depth, 'post_depth': args.post_depth}
    flags = {'depth': '--depth', 'use_implicit': '--use_implicit', 'pre_depth': '--pre_depth', 'post_depth': '--post_depth'}
    return load_vae_var(args.vae_ckpt, var_ckpt, device=device, expect=expect, flags=flags)


def effective_top_k(top_k: int, V: int) -> int:
    """top-k larger than the vocabulary keeps every token (the official code would crash in ``topk``)."""
    return min(top_k, V) if top_k > 0 else top_k


@torch.inference_mode()
def sample_batch(var, label_B: torch.Tensor, g_seed: int, args, top_k: int, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One ``autoregressive_infer_cfg`` call under the chosen autocast; images (B, 3, H, W) in [0, 1] in the dtype the
    model returns (fp16 under fp16 autocast, as in the official code)."""
    dev = label_B.device
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return var.autoregressive_infer_cfg(
            B=label_B.numel(), label_B=label_B, g_seed=g_seed, cfg=args.cfg, top_k=top_k, top_p=args.top_p,
            more_smooth=bool(args.more_smooth), iter_left=args.iter_left, iter_right=args.iter_right)


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 exactly as the official scripts convert: ``x * 255`` in the image's own dtype, then
    truncation toward zero by ``astype(np.uint8)`` (no rounding)."""
    x_BHW3 = img_B3HW.permute(0, 2, 3, 1).mul(255)
    if x_BHW3.dtype == torch.bfloat16:      # numpy has no bfloat16; bf16 -> fp32 is exact
        x_BHW3 = x_BHW3.float()
    return x_BHW3.cpu().numpy().astype(np.uint8)


def save_png_atomic(arr_HW3: np.ndarray, path: str) -> None:
    """PNG encoded in memory, written to a temporary file beside ``path`` and renamed over it."""
    buf = io.BytesIO()
    Image.fromarray(arr_HW3).save(buf, format='PNG')
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(buf.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def report_error(e: BaseException) -> None:
    if dist.get_local_rank() == 0:
        print(f'error: {e}', file=sys.stderr, flush=True)


# ================================ the unit of work =====================================================================
def units_of(num_classes: int, per_class: int, batch_size: int) -> List[Tuple[int, int, List[int]]]:
    """Every (class c, batch i, image indices) in index order: batch i of class c holds images
    ``c * per_class + i * batch_size + j`` (the last batch of a class may be shorter) and uses ``g_seed = seed + i``."""
    units = []
    for c in range(num_classes):
        for i in range(math.ceil(per_class / batch_size)):
            lo, hi = i * batch_size, min((i + 1) * batch_size, per_class)
            units.append((c, i, [c * per_class + j for j in range(lo, hi)]))
    return units


def folder_name(args, ckpt_depth: int) -> str:
    base = os.path.basename(args.ckpt_path)
    prefix = 'implicit' if args.use_implicit else f'd{ckpt_depth}'
    return f'{prefix}-{base}-cfg-{args.cfg}-seed-{args.seed}'


def image_settings(args, top_k: int, amp_dtype) -> Dict:
    """What decides the pixels of an image with a given index (recorded beside the images)."""
    s = dict(ckpt=os.path.basename(args.ckpt_path), vae_ckpt=os.path.basename(args.vae_ckpt), cfg=args.cfg,
             seed=args.seed, top_k=top_k, top_p=args.top_p, more_smooth=bool(args.more_smooth),
             per_class=args.per_class, batch_size=args.batch_size, dtype=dtype_name(amp_dtype))
    if args.use_implicit:
        s.update(iter_left=args.iter_left, iter_right=args.iter_right)
    return s


def check_or_record_settings(folder: str, settings: Dict) -> None:
    """Refuses to mix images of other settings into ``folder``; records the settings of a new folder."""
    path = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            diffs = [f'{k}={old.get(k)!r} (now {v!r})' for k, v in settings.items() if old.get(k) != v]
            if diffs:
                raise SamplingError(f'{folder} holds images sampled with other settings: {", ".join(diffs)}; rerun with '
                                    f'the recorded settings to resume, or pass another --sample_dir (or delete the folder)')
            return
    elif any(n.endswith('.png') for n in os.listdir(folder)):
        print(f'[sampling] {folder} has images but no {CONFIG_NAME}; assuming they were sampled with these settings')
    atomic_write_bytes(json.dumps(settings, indent=2, sort_keys=True).encode(), path)


def missing_indices(folder: str, indices: Sequence[int]) -> List[int]:
    return [k for k in indices if not png_is_valid(os.path.join(folder, f'{k:06d}.png'))]


def npz_is_current(npz_path: str, folder: str, num: int) -> bool:
    """True when ``npz_path`` holds ``num`` images and is newer than every PNG it packs."""
    import zipfile
    if not os.path.isfile(npz_path):
        return False
    try:
        with zipfile.ZipFile(npz_path) as zf, zf.open('arr_0.npy') as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except Exception:
        return False
    if dtype != np.uint8 or len(shape) != 4 or shape[0] != num:
        return False
    t_npz = os.path.getmtime(npz_path)
    return all(os.path.getmtime(os.path.join(folder, f'{k:06d}.png')) <= t_npz for k in range(num))


# ================================ main ================================================================================
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt_path', type=str, default='ckpts/viar.pth', help='VAR or VIAR checkpoint')
    p.add_argument('--sample_dir', type=str, default='samples', help='parent folder of the sample folder and npz')
    p.add_argument('--seed', type=int, default=1, help='batch i of every class uses g_seed = seed + i')
    p.add_argument('--num_classes', type=int, default=1000, help='sample classes 0 .. num_classes-1')
    p.add_argument('--per_class', type=int, default=50, help='images per class')
    p.add_argument('--batch_size', type=int, default=25, help='images per sampler call (a unit of work; changes the images)')
    add_common_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def main(args: argparse.Namespace) -> None:
    try:
        _sample(args)
    except (CheckpointError, MissingCheckpointError, SamplingError) as e:
        report_error(e)
        dist.destroy()
        sys.exit(1)
    except KeyboardInterrupt:
        report_error(KeyboardInterrupt('interrupted; every image written so far is kept: rerun the same command to resume'))
        dist.destroy()
        sys.exit(130)
    except OSError as e:    # disk full, permissions, a folder removed under us ...
        report_error(OSError(f'{e}; every image written so far is kept: fix this and rerun the same command to resume'))
        dist.destroy()
        sys.exit(1)
    dist.destroy()


def _sample(args: argparse.Namespace) -> None:
    if args.per_class < 1 or args.batch_size < 1 or args.num_classes < 1:
        raise SamplingError('--num_classes, --per_class and --batch_size must be positive')
    device = dist.init_distributed(args.device)
    rank, world, master = dist.get_rank(), dist.get_world_size(), dist.is_master()
    setup_backends(args.tf32)
    amp_dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)        # as the official script (the images only depend on g_seed)

    # 1. models (architecture read from the files; --depth / --use_implicit are checked against them)
    vae, var = load_models(args, device, args.ckpt_path)
    if args.num_classes > var.num_classes:
        raise SamplingError(f'--num_classes {args.num_classes} but {args.ckpt_path!r} has {var.num_classes} classes: '
                            f'pass --num_classes {var.num_classes} or fewer')
    top_k = effective_top_k(args.top_k, var.V)

    # 2. the folder, its recorded settings, the units of this rank
    folder = os.path.join(args.sample_dir, folder_name(args, var.depth))
    error = None
    if master:
        try:
            os.makedirs(folder, exist_ok=True)
            check_or_record_settings(folder, image_settings(args, top_k, amp_dtype))
            for n in os.listdir(folder):    # temporary files of an interrupted run
                if n.startswith('.') and n.endswith('.tmp'):
                    os.unlink(os.path.join(folder, n))
        except SamplingError as e:
            error = str(e)
        except OSError as e:
            error = f'cannot use {folder} as the sample folder ({e}): pass another --sample_dir'
    error = dist.broadcast_object(error)
    if error:
        raise SamplingError(error)
    dist.barrier()

    units = units_of(args.num_classes, args.per_class, args.batch_size)
    total = args.num_classes * args.per_class
    todo = []
    for c, i, idx in units[rank::world]:
        miss = missing_indices(folder, idx)
        if miss:
            todo.append((c, i, idx, miss))
    counts = dist.allreduce_mean(torch.tensor([len(todo), sum(len(t[3]) for t in todo)], dtype=torch.float64,
                                              device=device)).mul_(world).round_().long().tolist()
    if master:
        print(f'[sampling] {describe(var)} -> {folder}/ ({total} images: {args.num_classes} classes x {args.per_class}; '
              f'{total - counts[1]} already done, {counts[1]} to write in {counts[0]} batches on {world} process(es); '
              f'{dtype_name(amp_dtype)} on {device.type})', flush=True)

    # 3. sample; PNGs are encoded and written by a thread while the next batch is sampled
    t0, n_written = time.time(), 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for c, i, idx, miss in tqdm(todo, desc=f'rank {rank}', unit='batch', disable=not master, dynamic_ncols=True):
            label_B = torch.full((len(idx),), c, dtype=torch.long, device=device)
            imgs_BHW3 = to_uint8(sample_batch(var, label_B, args.seed + i, args, top_k, amp_dtype))
            if pending is not None:
                pending.result()
            jobs = [(imgs_BHW3[idx.index(k)], os.path.join(folder, f'{k:06d}.png')) for k in miss]
            pending = writer.submit(lambda jobs=jobs: [save_png_atomic(a, p) for a, p in jobs])
            n_written += len(miss)
        if pending is not None:
            pending.result()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    dist.barrier()
    n_all = int(round(dist.allreduce_mean(torch.tensor([float(n_written)], dtype=torch.float64, device=device)).item() * world))
    if master and n_all:
        print(f'[sampling] wrote {n_all} images in {elapsed:.1f} s: {n_all / max(elapsed, 1e-9):.2f} images/s '
              f'({world} process(es))', flush=True)

    # 4. pack the npz (rank 0) once every image exists
    error = None
    if master:
        npz_path = folder.rstrip('/') + '.npz'
        lost = [k for k in range(total) if not os.path.isfile(os.path.join(folder, f'{k:06d}.png'))]
        if lost:
            error = (f'{len(lost)} images are missing in {folder} (e.g. {lost[0]:06d}.png): rerun the same command to '
                     f'finish them')
        elif npz_is_current(npz_path, folder, total):
            print(f'[sampling] {npz_path} is up to date')
        else:
            try:
                create_npz_from_sample_folder(folder, num=total)
            except (OSError, ValueError) as e:
                error = f'packing {npz_path} failed ({e}); fix or delete the image named and rerun the same command'
    error = dist.broadcast_object(error)
    if error:
        raise SamplingError(error)


def describe(var) -> str:
    if var.use_implicit:
        return f'VIAR-d{var.depth} ({var.pre_depth} pre + 1 implicit + {var.post_depth} post blocks)'
    return f'VAR-d{var.depth}'


if __name__ == '__main__':
    main(parse_args())
