"""``sample_folder``: the FID sampler of ``sampling.py`` as a function -- resumable, sharded under torchrun.

    from models import from_pretrained
    from utils.folder_sampling import sample_folder
    vae, var = from_pretrained('out/viar-hub')
    npz = sample_folder(vae, var, 'samples/viar', classes=1000, per_class=50, seed=1, cfg=1.5, iter_left=10)

Images, seeding, resuming and the recorded ``sampling_config.json`` are those of ``sampling.py`` (see its module doc
and docs/sampling_evaluation.md): batch ``i`` of the class at position ``ci`` holds images ``ci * per_class +
i * batch_size + j`` and uses ``g_seed = seed + i``; (class, batch) units are dealt to the torchrun ranks
round-robin; PNGs that exist and decode are kept; a folder of other settings or other weights is refused.
"""
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
from utils.misc import (
    DiskFullError,
    atomic_write_bytes,
    create_npz_from_sample_folder,
    npz_array_header,
    npz_member_crc32,
    png_is_valid,
    save_png_atomic,
)
from utils.sampler_settings import SamplerSettings, SettingsError, schedule_name
from utils.sampling_utils import (
    FLEX_KWARGS,
    ITERATION_KWARGS,
    SamplingError,
    dtype_name,
    pretrained_name,
    sample_batch,
    to_uint8,
    weights_sha256,
)

__all__ = ['CONFIG_NAME', 'NPZ_KEY', 'check_or_record_settings', 'checkpoint_identity', 'folder_name', 'hub_identity',
           'image_settings', 'missing_indices',
           'model_fingerprint', 'npz_is_current', 'read_config', 'sample_folder', 'units_of', 'write_config']

CONFIG_NAME = 'sampling_config.json'
NPZ_KEY = 'npz_crc32'


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


def folder_name(ckpt_name: str, depth: int, implicit: bool, seed: int, kw: dict[str, Any]) -> str:
    """sampling.py's folder: ``implicit-{ckpt}-cfg-{cfg}-seed-{seed}`` (VIAR; ``-tol{t}``, ``-row``,
    ``-anderson{m}``, ``-warm`` before ``-seed``: ``fixed_point_suffix``), ``d{depth}-{ckpt}-cfg-{cfg}-seed-{seed}``
    (VAR); a FlexVAR model (``kw`` holding its schedule) names its schedule and guidance too:
    ``flexvar-d{depth}-{ckpt}-pn{1_2_..._16}-cfg-{cfg}-maxpn-{max_pn}[-llamagen]-seed-{seed}`` (implicit backbone:
    ``flexvar-implicit-d{depth}-...``).  ``kw``: the sampler keywords (``SamplerSettings.kwargs``)."""
    cfg = kw.get('cfg')
    if 'infer_patch_nums' in kw:
        kw = {**FLEX_KWARGS, **kw}
        prefix = f'flexvar-{"implicit-" if implicit else ""}d{depth}'
        guidance = f'cfg-{cfg}-maxpn-{kw["max_pn"]}{"-llamagen" if kw["used_llamagen_cfg"] else ""}'
        return f'{prefix}-{ckpt_name}-pn{schedule_name(kw["infer_patch_nums"])}-{guidance}-seed-{seed}'
    prefix = 'implicit' if implicit else f'd{depth}'
    return f'{prefix}-{ckpt_name}-cfg-{cfg}{fixed_point_suffix(kw) if implicit else ""}-seed-{seed}'


def fixed_point_suffix(kw: dict[str, Any]) -> str:
    """The VIAR fixed-point keywords that change the images, for the folder name: ``-tol{t}`` (``iter_tol``),
    ``-row`` (``iter_exit='row'``), ``-anderson{m}`` (and ``-beta{b}`` unless 1; ``iter_solver='anderson'``),
    ``-warm`` (``warm_start``); empty for the paper's sampler."""
    out = f'-tol{kw["iter_tol"]:g}' if kw.get('iter_tol') is not None else ''
    out += '-row' if kw.get('iter_exit') == 'row' else ''
    if kw.get('iter_solver') == 'anderson':
        out += f'-anderson{kw.get("anderson_m") or 5}'
        out += f'-beta{kw["anderson_beta"]:g}' if kw.get('anderson_beta', 1) not in (None, 1) else ''
    return out + ('-warm' if kw.get('warm_start') else '')


def image_settings(names: dict[str, Any], seed: int, per_class: int, batch_size: int, kw: dict[str, Any],
                   use_implicit: bool, amp_dtype) -> dict[str, Any]:
    """What decides the pixels of an image with a given index, besides the weights (recorded beside the images):
    ``names`` (sampling.py: the file names), seed and batching, precision, and the sampler keywords ``kw`` (the
    iteration ones only for a model with an implicit block, whose pixels they change)."""
    s = {**names, 'seed': seed, 'per_class': per_class, 'batch_size': batch_size, 'dtype': dtype_name(amp_dtype)}
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


def check_or_record_settings(folder: str, settings: dict[str, Any], weights: dict[str, tuple[str, str, str]]
                             ) -> dict[str, Any]:
    """Refuses to mix images of other settings, or of other weights, into ``folder``; records the settings and the
    fingerprints of the weights.  ``weights``: config key -> (fingerprint, what it is for the message, where the
    weights come from).  Returns the config as now recorded."""
    fingerprints = {k: v[0] for k, v in weights.items()}
    if not any(n.endswith('.png') for n in os.listdir(folder)):
        write_config(folder, {**settings, **fingerprints})       # nothing sampled yet: nothing to conflict with
        return {**settings, **fingerprints}
    old = read_config(folder)
    if old is None:
        raise SamplingError(f'{folder} holds images but no readable {CONFIG_NAME}, so nothing says which settings '
                            f'and weights made them: pass another --sample_dir or delete the folder')
    keys = list(settings) + [k for k in old if k not in settings and k != NPZ_KEY
                             and not k.endswith(('_sha256', '_fingerprint'))]
    diffs = [f'{k}={old.get(k)!r} (now {settings.get(k)!r})' for k in keys if old.get(k) != settings.get(k)]
    if diffs:
        raise SamplingError(f'{folder} holds images sampled with other settings: {", ".join(diffs)}; rerun with '
                            f'the recorded settings to resume, or pass another --sample_dir (or delete the folder)')
    changed = list(dict.fromkeys(what for key, (fp, what, _) in weights.items() if old.get(key) != fp))
    if changed:
        raise SamplingError(f'{folder} holds images sampled from other weights than the {" and the ".join(changed)} '
                            f'now hold{"" if len(changed) > 1 else "s"} (same file name, other contents, e.g. trained '
                            f'further; or none recorded): to sample these weights, pass another --sample_dir or '
                            f'delete the folder')
    return old


def missing_indices(folder: str, indices: Sequence[int]) -> list[int]:
    return [k for k in indices if not png_is_valid(os.path.join(folder, f'{k:06d}.png'))]


def npz_is_current(npz_path: str, folder: str, num: int, crc32: int | None = None) -> bool:
    """True when ``npz_path`` holds ``num`` uint8 images, is newer than every PNG it packs and is the file whose
    CRC-32 of ``arr_0`` was recorded (``crc32``; None: none recorded, so not current)."""
    if not os.path.isfile(npz_path):
        return False
    try:
        shape, _, dtype = npz_array_header(npz_path)
        if npz_member_crc32(npz_path) != crc32:
            return False
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    if dtype != 'uint8' or len(shape) != 4 or shape[0] != num:
        return False
    t_npz = os.path.getmtime(npz_path)
    return all(os.path.getmtime(os.path.join(folder, f'{k:06d}.png')) <= t_npz for k in range(num))


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """What identifies the weights of in-memory models, cheaply: the sha256 of every tensor's name, shape and dtype
    and of up to 4096 of its values, evenly strided (weights trained further change nearly all of them)."""
    import hashlib
    digest = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(f'{name}:{tuple(t.shape)}:{t.dtype}\n'.encode())
            digest.update(flat[::step].to('cpu', torch.float64 if t.is_floating_point() else torch.int64)
                          .numpy().tobytes())
    return digest.hexdigest()


def checkpoint_identity(ckpt_path: str, vae_path: str) -> tuple[dict[str, Any], dict[str, tuple[str, str, str]]]:
    """``sample_folder``'s ``names`` and ``weights`` for a checkpoint pair (as ``sampling.py`` records them): the
    file names, and the whole-file sha256 of each (``weights_sha256``)."""
    return ({'ckpt': os.path.basename(ckpt_path), 'vae_ckpt': os.path.basename(vae_path)},
            {'ckpt_sha256': (weights_sha256(ckpt_path), f'model checkpoint {ckpt_path!r}', ckpt_path),
             'vae_sha256': (weights_sha256(vae_path), f'tokenizer checkpoint {vae_path!r}', vae_path)})


def hub_identity(source: str, weights_path: str) -> tuple[dict[str, Any], dict[str, tuple[str, str, str]]]:
    """``names`` and ``weights`` for a hub folder or repository ``source`` whose ``model.safetensors`` is
    ``weights_path``."""
    return ({'pretrained': pretrained_name(source)},
            {'weights_sha256': (weights_sha256(weights_path), f'hub folder {source!r}', weights_path)})


# ================================ sampling ============================================================================
def sample_folder(vae, var, out_dir: str, classes, per_class: int, seed: int, *, batch_size: int = 25,
                  amp_dtype: torch.dtype | None = None, pack_npz: bool = True, names: dict[str, Any] | None = None,
                  weights: dict[str, tuple[str, str, str]] | None = None, settings: SamplerSettings | None = None,
                  **sampler) -> str:
    """Samples ``per_class`` images of each class of ``classes`` (an int n: classes 0..n-1; or a sequence) into
    ``out_dir/000000.png ...`` and packs ``out_dir + '.npz'`` (``pack_npz``); returns the npz path (the folder when
    not packed).  ``sampler``: ``SamplerSettings`` fields (``cfg``, ``top_k``, ``iter_left``, ...; or ``settings``),
    ``amp_dtype``: autocast dtype (None: fp32).  Rerunning skips every valid PNG; ``names`` (recorded settings such as
    the checkpoint names) and ``weights`` (config key -> (fingerprint, what, source)) identify the model; by default
    ``model_fingerprint(vae, var)``.  Under torchrun the (class, batch) units are dealt to the ranks; call it on every
    rank.  A user-fixable problem raises ``SamplingError``."""
    classes = list(range(classes)) if isinstance(classes, int) else [int(c) for c in classes]
    try:
        settings = settings or SamplerSettings(**sampler)
        settings.check()
        kw = settings.kwargs(var)
    except TypeError as e:
        raise SamplingError(f'sample_folder: {e}') from e
    except SettingsError as e:
        raise SamplingError(str(e)) from e
    bad = [c for c in classes if not 0 <= c < var.num_classes]
    if bad or not classes or per_class < 1 or batch_size < 1:
        raise SamplingError(f'sample_folder: classes must be in 0..{var.num_classes - 1} (got {bad or classes}), '
                            f'per_class and batch_size >= 1')
    rank, world, master = dist.get_rank(), dist.get_world_size(), dist.is_master()
    device = next(var.parameters()).device
    folder = out_dir

    # the folder, its recorded settings and weights, the units of this rank
    error, record = None, {}
    if master:
        if weights is None:
            weights = {'weights_fingerprint': (model_fingerprint(vae, var), 'models', 'the models given')}
        try:
            os.makedirs(folder, exist_ok=True)
            s = image_settings(names or {}, seed, per_class, batch_size, kw, var.use_implicit, amp_dtype)
            if classes != list(range(len(classes))):
                s['classes'] = classes
            record = check_or_record_settings(folder, s, weights)
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

    units = units_of(len(classes), per_class, batch_size)
    total = len(classes) * per_class
    todo = []
    for ci, i, idx in units[rank::world]:
        miss = missing_indices(folder, idx)
        if miss:
            todo.append((classes[ci], i, idx, miss))
    counts = dist.allreduce_mean(torch.tensor([len(todo), sum(len(t[3]) for t in todo)], dtype=torch.float64,
                                              device=device)).mul_(world).round_().long().tolist()
    if master:
        print(f'[sampling] {var.describe()} -> {folder}/ ({total} images: {len(classes)} classes x '
              f'{per_class}; {total - counts[1]} already done, {counts[1]} to write in {counts[0]} batches on '
              f'{world} process(es); {dtype_name(amp_dtype)} on {device.type})', flush=True)

    # sample; PNGs are encoded and written by a thread while the next batch is sampled
    t0, n_written = time.time(), 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for c, i, idx, miss in tqdm(todo, desc=f'rank {rank}', unit='batch', disable=not master, dynamic_ncols=True):
            label_B = torch.full((len(idx),), c, dtype=torch.long, device=device)
            imgs_BHW3 = to_uint8(sample_batch(var, label_B, seed + i, kw, amp_dtype))
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
    if not pack_npz:
        return folder

    # pack the npz (rank 0) once every image exists, and record which file it is
    error, npz_path = None, folder + '.npz'
    if master:
        lost = [k for k in range(total) if not os.path.isfile(os.path.join(folder, f'{k:06d}.png'))]
        if lost:
            error = (f'{len(lost)} images are missing in {folder} (e.g. {lost[0]:06d}.png): rerun the same command to '
                     f'finish them')
        elif npz_is_current(npz_path, folder, total, record.get(NPZ_KEY)):
            print(f'[sampling] {npz_path} is up to date')
        else:
            try:
                create_npz_from_sample_folder(folder, num=total)
            except DiskFullError as e:
                error = f'{e}, then rerun the same command (every image is kept)'
            except (OSError, ValueError) as e:
                error = f'packing {npz_path} failed ({e}); fix or delete the image named and rerun the same command'
        if error is None and record.get(NPZ_KEY) != (crc := npz_member_crc32(npz_path)):
            write_config(folder, {**record, NPZ_KEY: crc})
    error = dist.broadcast_object(error)
    if error:
        raise SamplingError(error)
    return npz_path
