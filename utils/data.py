"""ImageNet-style data for train.py and train_vae.py: ``DatasetFolder`` datasets with the official augmentations
(the folder layout is checked by ``utils.data_layout``), a resumable distributed batch sampler, and a scan that
decodes every image to list the unreadable ones at once (``--check_data``).

Reproducibility: the order of an epoch is a permutation drawn from ``(seed, epoch)`` (the same on every rank;
rank r takes its slice of each global batch), and every sample's random crop / flip is drawn from a seed that
travels with its index.  Resuming at (epoch, iteration) therefore replays exactly the batches an uninterrupted
run would have seen, whatever the number of DataLoader workers, and data loading never touches the global RNG.
"""
import math
import multiprocessing
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import PIL.Image as PImage
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder
from torchvision.transforms import InterpolationMode, transforms

from utils.data_layout import DataError, check_data_path, class_dirs

__all__ = ['DataError', 'check_data_path', 'build_dataset', 'ResumableBatchSampler', 'ShardSampler',
           'normalize_01_into_pm1', 'scan_images']

DECODE_ERRORS = (OSError, ValueError, PImage.DecompressionBombError)


def normalize_01_into_pm1(x: torch.Tensor) -> torch.Tensor:   # [0, 1] -> [-1, 1]
    return x.add(x).add_(-1)


def to_rgb(img: PImage.Image) -> PImage.Image:
    """An opened image as 8-bit RGB, as it looks: the EXIF orientation of a phone photo applied, and a 16-bit (or
    32-bit integer) grey image scaled to 8 bits (``convert('RGB')`` would clip it to an almost white picture)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith('I;16') or arr.max(initial=0) <= 65535 else float(arr.max())
        img = PImage.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), mode='L')
    return img.convert('RGB')


def open_rgb(path: str) -> PImage.Image:
    """The image file ``path`` decoded as 8-bit RGB (``to_rgb``); decoding errors propagate."""
    with open(path, 'rb') as f:
        return to_rgb(PImage.open(f))


def is_image_file(path: str) -> bool:
    """What the loaders take from a class folder: an image extension, and not a hidden name (``.DS_Store``, the
    ``._name.png`` AppleDouble files a copy from a Mac leaves beside each file)."""
    return not os.path.basename(path).startswith('.') and path.lower().endswith(IMG_EXTENSIONS)


def pil_loader(path: str) -> PImage.Image:
    try:
        return open_rgb(path)
    except DECODE_ERRORS as e:
        raise DataError(f'cannot read image {path!r} ({type(e).__name__}: {e}); delete or replace it, then rerun the '
                        f'same command (training resumes from the last checkpoint)', every_rank=True) from e


class ImageFolder(DatasetFolder):
    """``DatasetFolder`` with a given class -> index map (val/ uses train/'s) whose items can be fetched as
    ``ds[(index, aug_seed)]``: the random augmentation is then drawn from ``aug_seed`` (the global RNG is left
    untouched).  ``skip_bad``: an unreadable image is replaced by the next readable one of the folder order (the
    same one every time: resuming stays exact), and ``bad_files`` marks (shared with the DataLoader workers) every
    sample found unreadable: ``bad_indices()`` lists them."""

    def __init__(self, root: str, class_to_idx: Dict[str, int], transform, skip_bad: bool = False):
        self._class_to_idx = class_to_idx
        try:
            super().__init__(root, loader=pil_loader, is_valid_file=is_image_file, transform=transform,
                             allow_empty=True)
        except FileNotFoundError as e:
            raise DataError(f'{root!r}: {e}') from e
        have = {t for _, t in self.samples}
        self.empty_classes = [c for c in self.classes if self.class_to_idx[c] not in have]    # folders without images
        self.skip_bad = skip_bad
        self.bad_files = multiprocessing.Array('b', len(self.samples), lock=False) if skip_bad else None

    def find_classes(self, directory: str):
        present = set(class_dirs(directory))
        cls = [c for c in self._class_to_idx if c in present]
        return cls, {c: self._class_to_idx[c] for c in cls}

    def _load(self, index: int):
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                return self.loader(path), target
            except DataError:
                if not self.skip_bad:
                    raise
                self.bad_files[(index + k) % len(self.samples)] = 1
        raise DataError(f'{self.root!r} holds no readable image')

    def bad_indices(self) -> List[int]:
        """Indices of the samples found unreadable so far (``skip_bad``; by any DataLoader worker)."""
        if self.bad_files is None:
            return []
        return np.flatnonzero(np.frombuffer(self.bad_files, dtype=np.int8)).tolist()

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        img, target = self._load(index)
        if aug_seed is None:
            return self.transform(img), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.transform(img), target


def build_transforms(final_reso: int, hflip: bool = False, mid_reso: float = 1.125):
    """train: resize shorter side to round(mid_reso x R) (LANCZOS), random crop R, optional h-flip, to [-1, 1];
    val: the same resize, centre crop."""
    mid = round(mid_reso * final_reso)
    train_aug = [transforms.Resize(mid, interpolation=InterpolationMode.LANCZOS),
                 transforms.RandomCrop((final_reso, final_reso)), transforms.ToTensor(), normalize_01_into_pm1]
    if hflip:
        train_aug.insert(0, transforms.RandomHorizontalFlip())
    val_aug = [transforms.Resize(mid, interpolation=InterpolationMode.LANCZOS),
               transforms.CenterCrop((final_reso, final_reso)), transforms.ToTensor(), normalize_01_into_pm1]
    return transforms.Compose(train_aug), transforms.Compose(val_aug)


def build_dataset(data_path: str, final_reso: int, hflip: bool = False, mid_reso: float = 1.125,
                  skip_bad: bool = False, allow_empty: bool = False):
    """-> (class names, train set, val set); raises DataError on a malformed folder, or (unless ``allow_empty``:
    ``--check_data`` lists them with the unreadable images) on a class folder without images."""
    train_cls, _ = check_data_path(data_path)
    class_to_idx = {c: i for i, c in enumerate(train_cls)}
    train_aug, val_aug = build_transforms(final_reso, hflip=hflip, mid_reso=mid_reso)
    train_set = ImageFolder(os.path.join(data_path, 'train'), class_to_idx, train_aug, skip_bad=skip_bad)
    val_set = ImageFolder(os.path.join(data_path, 'val'), class_to_idx, val_aug, skip_bad=skip_bad)
    for ds in (train_set, val_set):
        if ds.empty_classes and not allow_empty:
            raise DataError(f'{ds.root!r}: Found no valid file for the classes {", ".join(ds.empty_classes[:5])}'
                            f'{" ..." if len(ds.empty_classes) > 5 else ""} (class folders without images: add images '
                            f'or remove the folders; --check_data lists every problem at once)')
    return train_cls, train_set, val_set


class _Decode(Dataset):
    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        """'' when image ``i`` decodes, else why not."""
        try:
            open_rgb(self.paths[i])
            return ''
        except DECODE_ERRORS as e:
            return f'{type(e).__name__}: {e}'


def scan_images(paths: Sequence[str], workers: int = 0) -> List[Tuple[str, str]]:
    """Decodes every image of ``paths`` (with ``workers`` processes) -> [(path, reason)] of the unreadable ones."""
    loader = DataLoader(_Decode(paths), batch_size=64, num_workers=workers, collate_fn=list)
    reasons = [r for batch in loader for r in batch]
    return [(p, r) for p, r in zip(paths, reasons) if r]


class ResumableBatchSampler(Sampler):
    """Per-rank batches of ``(index, aug_seed)`` for one epoch, starting at iteration ``start_it``.

    Epoch ``ep`` uses ``randperm(n)`` from a generator seeded with (seed, ep), padded by wrapping around to a whole
    number of global batches (``iters_per_epoch = ceil(n / glb_batch_size)``); iteration ``it`` is the global batch
    ``perm[it*G : (it+1)*G]`` of which rank r takes ``[r*b : (r+1)*b]``.  Call ``set_epoch(ep, start_it)`` before
    iterating.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        super().__init__()
        if n <= 0:
            raise DataError('the training set is empty')
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.glb_batch_size = batch_size * world_size
        self.seed, self.shuffle = seed, shuffle
        self.iters_per_epoch = math.ceil(n / self.glb_batch_size)
        self.epoch, self.start_it = 0, 0

    def set_epoch(self, epoch: int, start_it: int = 0):
        self.epoch, self.start_it = epoch, start_it

    def __len__(self) -> int:
        return max(0, self.iters_per_epoch - self.start_it)

    def _epoch_order(self) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        total = self.iters_per_epoch * self.glb_batch_size
        perm = perm.repeat(math.ceil(total / self.n))[:total]
        aug_seeds = torch.randint(0, 2 ** 62, (total,), generator=g)
        return perm, aug_seeds

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        perm, aug_seeds = self._epoch_order()
        G, b = self.glb_batch_size, self.batch_size
        for it in range(self.start_it, self.iters_per_epoch):
            lo = it * G + self.rank * b
            yield list(zip(perm[lo:lo + b].tolist(), aug_seeds[lo:lo + b].tolist()))


class ShardSampler(Sampler):
    """Evaluation: rank r reads indices r, r + W, r + 2W, ... (every image exactly once over all ranks)."""

    def __init__(self, n: int, rank: int, world_size: int):
        super().__init__()
        self.indices = list(range(rank, n, world_size))

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
