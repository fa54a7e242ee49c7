"""Small utilities shared by the scripts: atomic writes and the npz packer the VAR README tells users to call."""
import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ['atomic_write_bytes', 'save_atomic', 'create_npz_from_sample_folder', 'png_is_valid']


def _replace_atomically(write, path) -> None:
    """Calls ``write(file_object)`` on a temporary file beside ``path``, fsyncs it, then renames it over ``path``:
    a crash leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(data: bytes, path) -> None:
    _replace_atomically(lambda f: f.write(data), path)


def save_atomic(obj, path) -> None:
    """``torch.save`` through a temporary file and a rename.  Save only tensors, numbers, strings, lists and dicts
    so that the file loads with ``torch.load(..., weights_only=True)``."""
    _replace_atomically(lambda f: torch.save(obj, f), path)


def png_is_valid(path) -> bool:
    """True when ``path`` is a complete, decodable image file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def create_npz_from_sample_folder(sample_folder: str, num: Optional[int] = None) -> str:
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
        with zipfile.ZipFile(f, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open('arr_0.npy', mode='w', force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for i in range(num):
                    arr = first if i == 0 else read(i)
                    if arr.shape != first.shape:
                        raise ValueError(f'{folder / f"{i:06d}.png"} is {arr.shape}, expected {first.shape}')
                    member.write(np.ascontiguousarray(arr).tobytes())

    npz_path = f'{str(folder).rstrip("/")}.npz'
    _replace_atomically(write, npz_path)
    print(f'Saved .npz file to {npz_path} [shape={shape}].')
    return npz_path
