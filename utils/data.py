"""ImageNet-style data for train.py: checks of the folder layout, ``DatasetFolder`` datasets with the official
augmentations, and a resumable distributed batch sampler.

Reproducibility: the order of an epoch is a permutation drawn from ``(seed, epoch)`` (the same on every rank;
rank r takes its slice of each global batch), and every sample's random crop / flip is drawn from a seed that
travels with its index.  Resuming at (epoch, iteration) therefore replays exactly the batches an uninterrupted
run would have seen, whatever the number of DataLoader workers, and data loading never touches the global RNG.
"""
import math
import os
from typing import Dict, Iterator, List, Tuple

import PIL.Image as PImage
import torch
from torch.utils.data import Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder
from torchvision.transforms import InterpolationMode, transforms

__all__ = ['DataError', 'check_data_path', 'build_dataset', 'ResumableBatchSampler', 'ShardSampler',
           'normalize_01_into_pm1']


class DataError(RuntimeError):
    """The data folder is missing, malformed or holds an unreadable image; the message says what to do."""


def normalize_01_into_pm1(x: torch.Tensor) -> torch.Tensor:   # [0, 1] -> [-1, 1]
    return x.add(x).add_(-1)


def _class_dirs(folder: str) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def check_data_path(data_path: str) -> Tuple[List[str], List[str]]:
    """(train classes, val classes) of ``data_path``; raises DataError saying what is missing."""
    layout = f'expected {os.path.join(data_path, "train")}/<class>/<images> and {os.path.join(data_path, "val")}/<class>/<images>'
    if data_path in ('/path/to/imagenet', '/path/to/imagenet-1k'):
        raise DataError(f'--data_path is still the placeholder {data_path!r}: pass --data_path=/your/imagenet '
                        f'(the folder holding train/ and val/), or edit it in scripts/train.sh')
    if not os.path.exists(data_path):
        raise DataError(f'--data_path {data_path!r} does not exist ({layout})')
    if not os.path.isdir(data_path):
        raise DataError(f'--data_path {data_path!r} is a file, not a folder ({layout})')
    missing = [s for s in ('train', 'val') if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        raise DataError(f'--data_path {data_path!r} has no {" and no ".join(m + "/" for m in missing)} folder ({layout})')
    train_cls, val_cls = _class_dirs(os.path.join(data_path, 'train')), _class_dirs(os.path.join(data_path, 'val'))
    for split, cls in (('train', train_cls), ('val', val_cls)):
        if not cls:
            raise DataError(f'{os.path.join(data_path, split)!r} holds no class folders ({layout}); '
                            f'for ImageNet val, sort the images into one folder per class')
    extra = sorted(set(val_cls) - set(train_cls))
    if extra:
        raise DataError(f'{os.path.join(data_path, "val")!r} has class folders that train/ lacks: {extra[:5]}'
                        f'{" ..." if len(extra) > 5 else ""}; train/ and val/ must use the same class folder names')
    return train_cls, val_cls


def pil_loader(path: str) -> PImage.Image:
    try:
        with open(path, 'rb') as f:
            return PImage.open(f).convert('RGB')
    except (OSError, ValueError, PImage.DecompressionBombError) as e:
        raise DataError(f'cannot read image {path!r} ({type(e).__name__}: {e}); delete or replace it, then rerun the '
                        f'same command (training resumes from the last checkpoint)') from None


class ImageFolder(DatasetFolder):
    """``DatasetFolder`` with a given class -> index map (val/ uses train/'s) whose items can be fetched as
    ``ds[(index, aug_seed)]``: the random augmentation is then drawn from ``aug_seed`` (the global RNG is left
    untouched)."""

    def __init__(self, root: str, class_to_idx: Dict[str, int], transform):
        self._class_to_idx = class_to_idx
        try:
            super().__init__(root, loader=pil_loader, extensions=IMG_EXTENSIONS, transform=transform)
        except FileNotFoundError as e:
            raise DataError(f'{root!r}: {e}') from None

    def find_classes(self, directory: str):
        present = set(_class_dirs(directory))
        cls = [c for c in self._class_to_idx if c in present]
        return cls, {c: self._class_to_idx[c] for c in cls}

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        img = self.loader(path)
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


def build_dataset(data_path: str, final_reso: int, hflip: bool = False, mid_reso: float = 1.125):
    """-> (class names, train set, val set); raises DataError on a malformed folder."""
    train_cls, _ = check_data_path(data_path)
    class_to_idx = {c: i for i, c in enumerate(train_cls)}
    train_aug, val_aug = build_transforms(final_reso, hflip=hflip, mid_reso=mid_reso)
    train_set = ImageFolder(os.path.join(data_path, 'train'), class_to_idx, train_aug)
    val_set = ImageFolder(os.path.join(data_path, 'val'), class_to_idx, val_aug)
    return train_cls, train_set, val_set


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
