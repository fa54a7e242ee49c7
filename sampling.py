"""Samples the 50,000 class-conditional images of the FID protocol (50 per ImageNet class) and packs them in an npz.

    python sampling.py --ckpt_path ckpts/viar.pth --vae_ckpt ckpts/vae_ch160v4096z32.pth --cfg 1.5 --depth 30 \\
        --sample_dir samples --use_implicit True --iter_left 10 --iter_right 10
    torchrun --nproc_per_node=8 sampling.py ...            # same flags, same images, 8x faster

writes ``samples/implicit-viar.pth-cfg-1.5-seed-1/000000.png ... 049999.png`` and
``samples/implicit-viar.pth-cfg-1.5-seed-1.npz`` (key ``arr_0``, uint8 (N, H, W, 3), index order) for
``evaluator.py``.  A VAR checkpoint (no ``--use_implicit``) goes to ``samples/d{depth}-{ckpt}-cfg-{cfg}-seed-{seed}/``.

FlexVAR checkpoints (the kind is read from the file; the tokenizer defaults to ``ckpts/FlexVAE.pth``) sample any
schedule, ``--infer_pn`` (default: the model's own, ``256`` = 1_2_3_4_5_6_8_10_13_16 for the published files, the
``--pn`` it was trained on for a ``train.py --flex`` checkpoint; image side 16 x the last side), with FlexVAR's
guidance knobs ``--max_pn`` (16) and ``--used_llamagen_cfg`` (off); the official evaluation uses ``--cfg 2.5
--top_p 0.95``:

    python sampling.py --ckpt_path ckpts/FlexVARd24-epo349.pth --cfg 2.5 --top_p 0.95 --infer_pn 1_2_3_4_5_7_10_13_16

writes ``samples/flexvar-d24-FlexVARd24-epo349.pth-pn1_2_3_4_5_7_10_13_16-cfg-2.5-maxpn-16-seed-1/`` (an implicit
FlexVAR: ``flexvar-implicit-d{depth}-...``; ``-llamagen`` before ``-seed`` with ``--used_llamagen_cfg``).

Seeding (the official one): the images of class ``c`` are drawn in batches of ``--batch_size`` (25); batch ``i``
holds images ``c * per_class + i * batch_size + j`` and is sampled with ``g_seed = seed + i``.  With the defaults
this is exactly the official layout, so a published checkpoint gives the official images (on CUDA with the official
fp16 autocast).  When ``per_class`` is not a multiple of ``batch_size`` the last batch of a class is shorter and
uses the same rule (``g_seed = seed + i``); so do FlexVAR models (the official ``eval_c2i.py`` shuffles the classes
and samples without a seed: its images cannot be reproduced).  A (class, batch) unit is the unit of work: units are
dealt to the ``torchrun`` ranks round-robin, so the images do not depend on the number of processes.

Resuming: rerunning the same command skips every PNG that exists and decodes; a unit is sampled again only if one
of its PNGs is missing or broken, and then only those are written.  PNGs are written atomically (temporary file +
rename).  Every flag is checked before anything is loaded or written.

``<folder>/sampling_config.json`` records what decides the pixels: the settings (checkpoint and tokenizer file names,
cfg, seed, top_k, top_p, more_smooth, per_class, batch_size, dtype, for VIAR and implicit FlexVAR
iter_left/iter_right, for FlexVAR infer_patch_nums/max_pn/used_llamagen_cfg) and the
fingerprints of the weights (``ckpt_fingerprint``, ``vae_fingerprint``: sha256 of the file size and its first and
last 8 MiB, see ``utils.sampling_utils.weights_fingerprint``).  Resuming into a folder whose images were sampled with
other settings, or from other weights under the same file name (``local_output/ar-ckpt-last.pth`` trained further),
is refused; a recorded config without images is simply replaced.  Folders of older versions, without fingerprints,
are assumed to hold images of the current weights (a note says so) and get the fingerprints recorded.

Once every image exists, rank 0 packs the npz and records its checksum (``npz_crc32``, the CRC-32 of ``arr_0``) in
the config: a later run calls the npz up to date only if it is that very file, holds every image and is newer than
every PNG; otherwise it packs it again.
"""
import argparse
import json
import math
import os
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from utils import dist
from utils.errors import run_cli_or_exit
from utils.misc import (
    atomic_write_bytes,
    create_npz_from_sample_folder,
    npz_array_header,
    npz_member_crc32,
    png_is_valid,
    save_png_atomic,
)
from utils.sampling_utils import (
    FLEX_KWARGS,
    ITERATION_KWARGS,
    SEED_MAX,
    SamplingError,
    add_common_args,
    check_args,
    check_output_dir,
    dtype_name,
    guard_writes,
    load_models,
    sample_batch,
    sampler_kwargs,
    schedule_name,
    setup_device,
    to_uint8,
    weights_fingerprint,
)

PROG = 'sampling.py'
CONFIG_NAME = 'sampling_config.json'
FINGERPRINT_KEYS = {'ckpt_fingerprint': ('model checkpoint', 'ckpt_path'),
                    'vae_fingerprint': ('tokenizer checkpoint', 'vae_ckpt')}
NPZ_KEY = 'npz_crc32'
BOOKKEEPING_KEYS = (*FINGERPRINT_KEYS, NPZ_KEY)     # recorded in the config, but not settings


# ================================ the unit of work ====================================================================
def units_of(num_classes: int, per_class: int, batch_size: int) -> list[tuple[int, int, list[int]]]:
    """Every (class c, batch i, image indices) in index order: batch i of class c holds images
    ``c * per_class + i * batch_size + j`` (the last batch of a class may be shorter) and uses ``g_seed = seed + i``."""
    units = []
    for c in range(num_classes):
        for i in range(math.ceil(per_class / batch_size)):
            lo, hi = i * batch_size, min((i + 1) * batch_size, per_class)
            units.append((c, i, [c * per_class + j for j in range(lo, hi)]))
    return units


def folder_name(args, ckpt_depth: int, kw: dict[str, Any] | None = None) -> str:
    """``implicit-{ckpt}-cfg-{cfg}-seed-{seed}`` (VIAR; ``-tol{t}`` before ``-seed`` with ``--iter_tol``),
    ``d{depth}-{ckpt}-cfg-{cfg}-seed-{seed}`` (VAR); a FlexVAR
    model (``kw`` from ``sampler_kwargs``, holding its schedule) names its schedule and guidance too:
    ``flexvar-d{depth}-{ckpt}-pn{1_2_..._16}-cfg-{cfg}-maxpn-{max_pn}[-llamagen]-seed-{seed}`` (implicit backbone:
    ``flexvar-implicit-d{depth}-...``)."""
    base = os.path.basename(args.ckpt_path)
    if kw and 'infer_patch_nums' in kw:
        kw = {**FLEX_KWARGS, **kw}
        prefix = f'flexvar-{"implicit-" if args.use_implicit else ""}d{ckpt_depth}'
        guidance = f'cfg-{args.cfg}-maxpn-{kw["max_pn"]}{"-llamagen" if kw["used_llamagen_cfg"] else ""}'
        return f'{prefix}-{base}-pn{schedule_name(kw["infer_patch_nums"])}-{guidance}-seed-{args.seed}'
    prefix = 'implicit' if args.use_implicit else f'd{ckpt_depth}'
    tol = f'-tol{args.iter_tol:g}' if args.use_implicit and getattr(args, 'iter_tol', None) is not None else ''
    return f'{prefix}-{base}-cfg-{args.cfg}{tol}-seed-{args.seed}'


def image_settings(args, kw: dict[str, Any], use_implicit: bool, amp_dtype) -> dict[str, Any]:
    """What decides the pixels of an image with a given index, besides the weights (recorded beside the images):
    the file names, seed and batching, precision, and the sampler keywords ``kw`` (``sampler_kwargs``; the
    iteration ones only for VIAR, whose pixels they change)."""
    s = {'ckpt': os.path.basename(args.ckpt_path), 'vae_ckpt': os.path.basename(args.vae_ckpt), 'seed': args.seed,
         'per_class': args.per_class, 'batch_size': args.batch_size, 'dtype': dtype_name(amp_dtype)}
    s.update({k: v for k, v in kw.items() if use_implicit or k not in ITERATION_KWARGS})
    return json.loads(json.dumps(s))        # as read back from the file (tuples become lists)


# ================================ the recorded config =================================================================
def read_config(folder: str) -> dict[str, Any] | None:
    """The recorded config of ``folder``, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def write_config(folder: str, record: dict[str, Any]) -> None:
    atomic_write_bytes(json.dumps(record, indent=2, sort_keys=True).encode(), os.path.join(folder, CONFIG_NAME))


def check_or_record_settings(folder: str, settings: dict[str, Any], fingerprints: dict[str, str],
                             args) -> tuple[dict[str, Any], bool]:
    """Refuses to mix images of other settings, or of other weights, into ``folder``; records the settings and the
    fingerprints of the weights.  Returns (the config as now recorded, whether the folder's images predate
    fingerprints and are only assumed to come from these weights)."""
    old = read_config(folder)
    if not any(n.endswith('.png') for n in os.listdir(folder)):
        write_config(folder, {**settings, **fingerprints})       # nothing sampled yet: nothing to conflict with
        return {**settings, **fingerprints}, False
    if old is None:
        print(f'[sampling] {folder} has images but no readable {CONFIG_NAME}; assuming they were sampled with these '
              f'settings and weights', flush=True)
        record = {**settings, **fingerprints}
        write_config(folder, record)
        return record, True

    keys = list(settings) + [k for k in old if k not in settings and k not in BOOKKEEPING_KEYS]
    diffs = [f'{k}={old.get(k)!r} (now {settings.get(k)!r})' for k in keys if old.get(k) != settings.get(k)]
    if diffs:
        raise SamplingError(f'{folder} holds images sampled with other settings: {", ".join(diffs)}; rerun with '
                            f'the recorded settings to resume, or pass another --sample_dir (or delete the folder)')
    changed = [f'{what} {getattr(args, flag)!r}' for key, (what, flag) in FINGERPRINT_KEYS.items()
               if key in old and old[key] != fingerprints[key]]
    if changed:
        raise SamplingError(f'{folder} holds images sampled from other weights than the {" and the ".join(changed)} '
                            f'now hold{"" if len(changed) > 1 else "s"} (same file name, other contents, e.g. trained '
                            f'further): to sample these weights, pass another --sample_dir or delete the folder')
    if all(old.get(k) == v for k, v in fingerprints.items()):
        return old, False
    print(f'[sampling] {os.path.join(folder, CONFIG_NAME)} records no fingerprint of the weights (an older version '
          f'wrote it): assuming its images come from {args.ckpt_path} and {args.vae_ckpt} as they are now, and '
          f'recording their fingerprints', flush=True)
    record = {**old, **fingerprints}
    write_config(folder, record)
    return record, True


def missing_indices(folder: str, indices: Sequence[int]) -> list[int]:
    return [k for k in indices if not png_is_valid(os.path.join(folder, f'{k:06d}.png'))]


def npz_is_current(npz_path: str, folder: str, num: int, crc32: int | None = None, check_crc: bool = True) -> bool:
    """True when ``npz_path`` holds ``num`` uint8 images, is newer than every PNG it packs and (``check_crc``) is the
    file whose CRC-32 of ``arr_0`` was recorded (``crc32``; None: none recorded, so not current)."""
    if not os.path.isfile(npz_path):
        return False
    try:
        shape, _, dtype = npz_array_header(npz_path)
        if check_crc and npz_member_crc32(npz_path) != crc32:
            return False
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    if dtype != 'uint8' or len(shape) != 4 or shape[0] != num:
        return False
    t_npz = os.path.getmtime(npz_path)
    return all(os.path.getmtime(os.path.join(folder, f'{k:06d}.png')) <= t_npz for k in range(num))


# ================================ main ================================================================================
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt_path', type=str, default='ckpts/viar.pth', help='VAR, VIAR or FlexVAR checkpoint')
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


def main(args: argparse.Namespace) -> None:
    """Samples (see the module doc); a user error ends the process with one line and status 1, Ctrl-C with 130."""
    run_cli_or_exit(lambda: sample(args), PROG,
                    interrupted='interrupted; every image written so far is kept: rerun the same command to resume')


def sample(args: argparse.Namespace) -> None:
    check_sampling_args(args)
    device, amp_dtype = setup_device(args)
    with guard_writes('every image written so far is kept: fix this and rerun the same command to resume',
                      every_rank=True):     # disk full, permissions, a folder removed under us ...: this rank's own
        _sample(args, device, amp_dtype)


def _sample(args: argparse.Namespace, device: torch.device, amp_dtype) -> None:
    rank, world, master = dist.get_rank(), dist.get_world_size(), dist.is_master()
    torch.manual_seed(args.seed)        # as the official script (the images only depend on g_seed)

    # 1. models (architecture read from the files; --depth / --use_implicit are checked against them)
    _, var = load_models(args, device, args.ckpt_path)
    if args.num_classes > var.num_classes:
        raise SamplingError(f'--num_classes {args.num_classes} but {args.ckpt_path!r} has {var.num_classes} classes: '
                            f'pass --num_classes {var.num_classes} or fewer')
    kw = sampler_kwargs(args, var)

    # 2. the folder, its recorded settings and weights, the units of this rank
    folder = os.path.join(args.sample_dir, folder_name(args, var.depth, kw))
    error, record, legacy = None, {}, False
    if master:
        fingerprints = {key: weights_fingerprint(getattr(args, flag)) for key, (_, flag) in FINGERPRINT_KEYS.items()}
        try:
            os.makedirs(folder, exist_ok=True)
            record, legacy = check_or_record_settings(folder, image_settings(args, kw, var.use_implicit, amp_dtype),
                                                      fingerprints, args)
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
        print(f'[sampling] {var.describe()} -> {folder}/ ({total} images: {args.num_classes} classes x '
              f'{args.per_class}; {total - counts[1]} already done, {counts[1]} to write in {counts[0]} batches on '
              f'{world} process(es); {dtype_name(amp_dtype)} on {device.type})', flush=True)

    # 3. sample; PNGs are encoded and written by a thread while the next batch is sampled
    t0, n_written = time.time(), 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for c, i, idx, miss in tqdm(todo, desc=f'rank {rank}', unit='batch', disable=not master, dynamic_ncols=True):
            label_B = torch.full((len(idx),), c, dtype=torch.long, device=device)
            imgs_BHW3 = to_uint8(sample_batch(var, label_B, args.seed + i, kw, amp_dtype))
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
    n_mean = dist.allreduce_mean(torch.tensor([float(n_written)], dtype=torch.float64, device=device)).item()
    n_all = round(n_mean * world)
    if master and n_all:
        print(f'[sampling] wrote {n_all} images in {elapsed:.1f} s: {n_all / max(elapsed, 1e-9):.2f} images/s '
              f'({world} process(es))', flush=True)

    # 4. pack the npz (rank 0) once every image exists, and record which file it is
    error = None
    if master:
        npz_path = folder + '.npz'
        lost = [k for k in range(total) if not os.path.isfile(os.path.join(folder, f'{k:06d}.png'))]
        if lost:
            error = (f'{len(lost)} images are missing in {folder} (e.g. {lost[0]:06d}.png): rerun the same command to '
                     f'finish them')
        elif npz_is_current(npz_path, folder, total, record.get(NPZ_KEY), check_crc=not legacy):
            print(f'[sampling] {npz_path} is up to date')
        else:
            try:
                create_npz_from_sample_folder(folder, num=total)
            except (OSError, ValueError) as e:
                error = f'packing {npz_path} failed ({e}); fix or delete the image named and rerun the same command'
        if error is None and record.get(NPZ_KEY) != (crc := npz_member_crc32(npz_path)):
            write_config(folder, {**record, NPZ_KEY: crc})
    error = dist.broadcast_object(error)
    if error:
        raise SamplingError(error)


if __name__ == '__main__':
    main(parse_args())
