"""A demo dataset drawn on the fly (no download), and a small classifier to score generated samples.

``make_demo_dataset(root)`` writes an ImageFolder ``root/train/<class>/NNNNN.png`` and ``root/val/<class>/...``
of 64 px images in a few visually distinct classes: each class is a shape *and* a colour family on a textured
background, with random position, size, rotation, hue jitter and noise.  Everything is drawn from
``(seed, split, class, index)``: the same call always writes the same files, and a rerun only writes what is
missing (a ``.complete`` marker records a finished folder).

``DemoClassifier`` is a small CNN; ``train_classifier`` fits it on the demo train split in seconds on a CPU.
It stands in for the Inception network of the FID evaluator (whose graph cannot be downloaded here) to check
that class-conditional samples show the requested class.
"""
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'draw_image', 'render_batch', 'make_demo_dataset', 'load_folder', 'DemoClassifier',
           'train_classifier', 'classify', 'DemoDataError']

# name -> (shape, base RGB colour, background texture)
CLASSES: Dict[str, Tuple[str, Tuple[int, int, int], str]] = {
    'red_disc':          ('disc',     (220, 40, 40),   'plain'),
    'green_square':      ('square',   (40, 190, 60),   'plain'),
    'blue_triangle':     ('triangle', (50, 80, 230),   'plain'),
    'yellow_ring':       ('ring',     (235, 205, 40),  'plain'),
    'purple_stripes':    ('stripes',  (150, 60, 200),  'none'),
    'cyan_checker':      ('checker',  (40, 200, 210),  'none'),
    'orange_cross':      ('cross',    (245, 140, 30),  'plain'),
    'white_dots':        ('dots',     (240, 240, 240), 'dark'),
}
RESO = 64


class DemoDataError(RuntimeError):
    """The demo data folder cannot be written or read; the message says what to do."""


def _jitter(rgb, rng: np.random.Generator, amount: int = 25) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_image(class_name: str, rng: np.random.Generator, reso: int = RESO) -> Image.Image:
    """One image of ``class_name`` drawn with ``rng`` (drawn at 4x and downsampled: smooth edges)."""
    shape, colour, bg = CLASSES[class_name]
    S = reso * 4
    colour = _jitter(colour, rng)
    if bg == 'dark':
        back = tuple(int(x) for x in rng.integers(10, 60, 3))
    else:       # a light-to-mid grey background with a faint tint: the shape colour is what stands out
        g = int(rng.integers(90, 170))
        back = _jitter((g, g, g), rng, 15)
    img = Image.new('RGB', (S, S), back)
    d = ImageDraw.Draw(img)
    cx, cy = (rng.uniform(0.35, 0.65, 2) * S)
    r = rng.uniform(0.22, 0.34) * S
    angle = rng.uniform(0, 2 * math.pi)

    def poly(n, radius, rot):
        return [(cx + radius * math.cos(rot + 2 * math.pi * k / n), cy + radius * math.sin(rot + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == 'disc':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'square':
        d.polygon(poly(4, r * 1.2, angle), fill=colour)
    elif shape == 'triangle':
        d.polygon(poly(3, r * 1.3, angle), fill=colour)
    elif shape == 'ring':
        w = r * rng.uniform(0.3, 0.45)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=back)
    elif shape == 'cross':
        w = r * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            d.polygon([(cx - dx * r * 1.2 + px, cy - dy * r * 1.2 + py), (cx + dx * r * 1.2 + px, cy + dy * r * 1.2 + py),
                       (cx + dx * r * 1.2 - px, cy + dy * r * 1.2 - py), (cx - dx * r * 1.2 - px, cy - dy * r * 1.2 - py)],
                      fill=colour)
    elif shape == 'stripes':       # diagonal stripes over the whole image
        period = rng.uniform(0.18, 0.26) * S
        dark = tuple(c // 4 for c in colour)
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        a = angle % math.pi
        phase = ((xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform(0, 1)) % 1.0
        arr = np.where((phase < 0.5)[..., None], np.array(colour, np.float32), np.array(dark, np.float32))
        img = Image.fromarray(arr.astype(np.uint8))
    elif shape == 'checker':
        cell = rng.uniform(0.16, 0.24) * S
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        ox, oy = rng.uniform(0, cell, 2)
        on = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0
        arr = np.where(on[..., None], np.array(colour, np.float32), np.array((235, 235, 235), np.float32))
        img = Image.fromarray(arr.astype(np.uint8))
    elif shape == 'dots':
        n = int(rng.integers(7, 12))
        for x, y in rng.uniform(0.08, 0.92, (n, 2)) * S:
            rr = rng.uniform(0.05, 0.08) * S
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_jitter(colour, rng, 15))
    else:
        raise ValueError(shape)
    img = img.resize((reso, reso), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (reso, reso, 3))     # a little sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _rng_for(seed: int, split: str, c: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0 if split == 'train' else 1, c, i])


def class_names(num_classes: Optional[int] = None) -> List[str]:
    names = list(CLASSES)
    n = len(names) if num_classes is None else num_classes
    if not 1 <= n <= len(names):
        raise DemoDataError(f'the demo dataset has 1 to {len(names)} classes, {num_classes} were asked for')
    return names[:n]


def render_batch(num_per_class: int, num_classes: Optional[int] = None, split: str = 'train', seed: int = 0,
                 reso: int = RESO) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same images as ``make_demo_dataset`` would write, in memory: (images (N, 3, H, W) in [-1, 1], labels)."""
    imgs, labels = [], []
    for c, name in enumerate(class_names(num_classes)):
        for i in range(num_per_class):
            a = np.asarray(draw_image(name, _rng_for(seed, split, c, i), reso), dtype=np.float32)
            imgs.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
            labels.append(c)
    return torch.stack(imgs), torch.tensor(labels)


def make_demo_dataset(root, num_train: int = 300, num_val: int = 50, num_classes: Optional[int] = None,
                      seed: int = 0, reso: int = RESO, verbose: bool = True) -> List[str]:
    """Writes ``root/{train,val}/<class>/NNNNN.png``; returns the class names (folder order = label order).

    Resumable: existing files are kept, missing ones drawn; a finished folder has ``root/.complete`` holding the
    parameters, so a rerun with the same parameters returns at once and one with other parameters says so."""
    root = Path(root)
    names = class_names(num_classes)
    params = {'classes': names, 'num_train': num_train, 'num_val': num_val, 'seed': seed, 'reso': reso}
    marker = root / '.complete'
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if done == params:
            if verbose:
                print(f'[data] {root} already holds the demo dataset ({len(names)} classes)')
            return names
        raise DemoDataError(f'{root} holds a demo dataset made with other parameters ({done}); delete the folder '
                            f'or pass another output folder')
    try:
        n_written = 0
        for split, n in (('train', num_train), ('val', num_val)):
            for c, name in enumerate(names):
                d = root / split / name
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    p = d / f'{i:05d}.png'
                    if p.exists():
                        continue
                    tmp = d / f'.{i:05d}.png.tmp'
                    draw_image(name, _rng_for(seed, split, c, i), reso).save(tmp, format='PNG')
                    os.replace(tmp, p)      # a killed run never leaves a truncated PNG
                    n_written += 1
        marker.write_text(json.dumps(params))
    except OSError as e:
        raise DemoDataError(f'cannot write the demo dataset under {root}: {e.strerror or e}; pass a writable folder') from None
    if verbose:
        print(f'[data] wrote {n_written} images: {len(names)} classes x ({num_train} train + {num_val} val) '
              f'at {reso} px in {root}')
    return names


def load_folder(folder, max_per_class: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """An ImageFolder split -> (images (N, 3, H, W) in [-1, 1], labels, class names in sorted folder order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DemoDataError(f'{folder} does not exist: make the demo data first (python demo.py)')
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))
    imgs, labels = [], []
    for c, name in enumerate(names):
        files = sorted((folder / name).glob('*.png'))[:max_per_class]
        for f in files:
            with Image.open(f) as im:
                imgs.append(torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
            labels.append(c)
    if not imgs:
        raise DemoDataError(f'{folder} holds no class folders with PNG images')
    return torch.stack(imgs), torch.tensor(labels), names


# ============================================== the sample classifier =================================================
class DemoClassifier(nn.Module):
    """A small CNN for 64 px images in [-1, 1] (about 60k parameters)."""

    def __init__(self, num_classes: int, width: int = 24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 32
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # 16
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 8
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x_B3HW):
        return self.head(self.features(x_B3HW).mean(dim=(2, 3)))


def _augment(x_B3HW: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips and small shifts (generated samples are not pixel-aligned with the training images)."""
    B = x_B3HW.shape[0]
    flip = torch.rand(B, generator=g) < 0.5
    x_B3HW = torch.where(flip[:, None, None, None], x_B3HW.flip(3), x_B3HW)
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
    return torch.roll(x_B3HW, shifts=(dy, dx), dims=(2, 3))


def train_classifier(x_B3HW: torch.Tensor, y_B: torch.Tensor, num_classes: int, steps: int = 300, bs: int = 64,
                     seed: int = 0, lr: float = 3e-3, verbose: bool = False) -> DemoClassifier:
    """Fits a ``DemoClassifier`` (AdamW, augmented mini-batches); returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x_B3HW.shape[0], (bs,), generator=g)
        loss = F.cross_entropy(model(_augment(x_B3HW[idx], g)), y_B[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and (step + 1) % 100 == 0:
            print(f'[classifier] step {step + 1}/{steps} loss {loss.item():.4f}')
    return model.eval()


@torch.no_grad()
def classify(model: DemoClassifier, x_B3HW: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """Predicted class of each image (images in [-1, 1])."""
    return torch.cat([model(x_B3HW[i:i + bs]).argmax(1) for i in range(0, x_B3HW.shape[0], bs)])
