"""Small utilities shared by the scripts: atomic writes (files, checkpoints, PNGs), the npz packer the VAR README
tells users to call, and cheap reads of an npz's array header and checksum (no array data is read).

Imports only numpy at module level (torch and PIL where they are needed), so that ``evaluator.py`` can use it
without loading PyTorch next to TensorFlow.
"""
import errno
import io
import os
import secrets
import shutil
import zipfile
from pathlib import Path

import numpy as np

from utils.errors import UserError

__all__ = [
    'DiskFullError',
    'atomic_save_to_path',
    'atomic_write',
    'atomic_write_bytes',
    'create_npz_from_sample_folder',
    'disk_full_cause',
    'disk_full_message',
    'npz_array_header',
    'npz_member_crc32',
    'png_is_valid',
    'read_npy_header',
    'save_atomic',
    'save_png_atomic',
]


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write ran out of disk space (or quota): one line naming the file, the free space and what was kept."""


def disk_full_cause(e: BaseException):
    """The ``OSError`` ENOSPC / EDQUOT behind ``e`` (``e`` itself, or an error it was raised from or during: torch's
    zip writer turns a full disk into a ``RuntimeError`` whose context is the ``OSError``), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(path, e: OSError, existed: bool = True, kept: str | None = None) -> str:
    """One sentence for a write of ``path`` that ran out of space: the free space of its filesystem and whether the
    previous file is kept (``existed``) -- the atomic writes leave no partial file behind; ``kept``: say this
    instead."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        free = f'{shutil.disk_usage(folder).free / 2 ** 20:,.1f} MiB free'
    except OSError:
        free = 'free space unknown'
    what = 'quota exceeded' if e.errno == errno.EDQUOT else 'disk full'
    if kept is None:
        kept = (f'the previous {path.name} is kept unchanged' if existed else f'no {path.name} was written') + \
            ' (no partial file left)'
    return f'{what} while writing {path} ({free} on {folder}); {kept}: free some space'


def atomic_write(write, path, fsync: bool = True) -> None:
    """Calls ``write(file_object)`` on a temporary file beside ``path`` (``.<name>.<pid>.<random>.tmp``, created with
    the usual permissions, i.e. 0o666 less the umask), then renames it over ``path``: a crash or an error leaves either
    the old file or the new one, never a truncated one, and no temporary file.  ``fsync``: flush the data to disk
    before the rename (also survives a power loss); files that are checked when read back can skip it.  Creates the
    parent folder.  A full disk or quota (ENOSPC / EDQUOT, also behind another error) raises ``DiskFullError``, one
    line (``disk_full_message``)."""
    def to_file(fd: int, tmp: Path) -> None:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    _atomic(to_file, path)


def atomic_save_to_path(save, path) -> None:
    """``atomic_write`` for a writer that takes a file name, not a file object (``safetensors.torch.save_file``):
    ``save(temporary_path)``, then the rename; the same temporary name, clean-up and disk-full line."""
    def to_path(fd: int, tmp: Path) -> None:
        os.close(fd)
        save(str(tmp))
    _atomic(to_path, path)


def _atomic(fill, path) -> None:
    """Creates the temporary file beside ``path`` (exclusively), calls ``fill(fd, tmp_path)``, renames it over
    ``path``; on any error removes it and turns a full disk into ``DiskFullError``."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
                break
            except FileExistsError:
                continue
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(disk_full_message(path, e, existed)) from e
        raise
    try:
        fill(fd, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = disk_full_cause(e)
        if full is not None:
            raise DiskFullError(disk_full_message(path, full, existed)) from e
        raise


def atomic_write_bytes(data: bytes, path, fsync: bool = True) -> None:
    atomic_write(lambda f: f.write(data), path, fsync=fsync)


def save_atomic(obj, path) -> None:
    """``torch.save`` through a temporary file and a rename.  Save only tensors, numbers, strings, lists and dicts
    so that the file loads with ``torch.load(..., weights_only=True)``."""
    import torch
    atomic_write(lambda f: torch.save(obj, f), path)


def save_png_atomic(arr_HW3: np.ndarray, path) -> None:
    """A uint8 (H, W, 3) image as a PNG at ``path``: encoded in memory, then written atomically.  Not fsynced: the
    sampler checks every PNG by decoding it (``png_is_valid``) before trusting it, so a file a power loss emptied is
    simply sampled again."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr_HW3).save(buf, format='PNG')
    atomic_write_bytes(buf.getbuffer(), path, fsync=False)


def png_is_valid(path) -> bool:
    """True when ``path`` is a complete, decodable image file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------------
def read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f`` (format 1.0 or 2.0), leaving ``f`` at the first data
    byte.  ``ValueError`` when ``f`` does not start with a readable header."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f'unsupported .npy format version {version}')


def npz_array_header(path, key: str = 'arr_0') -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the array ``key`` of the .npz at ``path``, without reading its data.
    Raises ``KeyError`` when the archive has no such array, ``OSError`` / ``zipfile.BadZipFile`` / ``ValueError``
    when it cannot be read."""
    with zipfile.ZipFile(path) as zf, zf.open(key + '.npy') as f:
        return read_npy_header(f)


def npz_member_crc32(path, key: str = 'arr_0') -> int:
    """The CRC-32 of the array ``key`` of an .npz as its zip directory records it: identifies the array's bytes
    without reading them."""
    with zipfile.ZipFile(path) as zf:
        return zf.getinfo(key + '.npy').CRC


def create_npz_from_sample_folder(sample_folder: str, num: int | None = None) -> str:
    """Packs ``{sample_folder}/000000.png ...`` (in index order) into ``{sample_folder}.npz`` with key ``arr_0``,
    uint8 (N, H, W, 3) — the layout the OpenAI evaluator reads.

    ``num``: how many images (default: every ``NNNNNN.png`` in the folder, which must be 0..N-1 without gaps).
    The array is streamed into the archive image by image (bounded memory even for 50,000 images) and the npz
    is written atomically.
    """
    from PIL import Image
    folder = Path(sample_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'sample folder {folder} does not exist')
    if num is None:
        indices = sorted(int(p.stem) for p in folder.glob('*.png') if p.stem.isdigit())
        num = len(indices)
        if indices != list(range(num)):
            missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))[:5]
            raise FileNotFoundError(f'{folder} is missing images {missing}...: rerun the sampler to finish them')
    if num == 0:
        raise FileNotFoundError(f'{folder} holds no NNNNNN.png images')

    def read(i: int) -> np.ndarray:
        p = folder / f'{i:06d}.png'
        if not p.exists():
            raise FileNotFoundError(f'{p} is missing: rerun the sampler to finish it')
        with Image.open(p) as im:
            return np.asarray(im.convert('RGB'), dtype=np.uint8)

    first = read(0)
    shape = (num,) + first.shape
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False, 'shape': shape}

    def write(f):
        with (zipfile.ZipFile(f, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
              zf.open('arr_0.npy', mode='w', force_zip64=True) as member):
            np.lib.format.write_array_header_2_0(member, header)
            for i in range(num):
                arr = first if i == 0 else read(i)
                if arr.shape != first.shape:
                    raise ValueError(f'{folder / f"{i:06d}.png"} is {arr.shape}, expected {first.shape}')
                member.write(np.ascontiguousarray(arr).tobytes())

    npz_path = f'{str(folder).rstrip("/")}.npz'
    atomic_write(write, npz_path)
    print(f'Saved .npz file to {npz_path} [shape={shape}].')
    return npz_path
