"""The demo dataset, drawn on the fly (no download).

``make_demo_dataset(root)`` writes an ImageFolder ``root/train/<class>/NNNNN.png`` and ``root/val/<class>/...`` of
32 px images (by default) in eight classes that a person can name at a glance: a red disc, a green square, a blue
triangle, a yellow ring, magenta stripes, a cyan checkerboard, an orange cross and a white star, each a bold shape on a
plain light, dark or navy background, with random position, size, tilt, shade and a little noise.  Everything is drawn
from ``(seed, split, class, index)``: the same call always writes the same bytes, and a rerun only writes what is
missing (a ``.complete`` marker records a finished folder).

The classifier that scores the demo's samples is ``models.demo_classifier``.
"""
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from utils.errors import UserError

__all__ = ['CLASSES', 'RESO', 'class_names', 'draw_image', 'render_batch', 'make_demo_dataset', 'load_folder',
           'DemoDataError']

# name -> (shape, base RGB colour, background: light grey, dark grey or navy).  Every class differs from every other in
# shape *and* in its colours (the coarsest token maps, a few tokens per image, already tell the classes apart); a
# shape covers about half of the image on a plain background of strong contrast, so a small tokenizer at 32 px keeps
# it.
CLASSES: Dict[str, Tuple[str, Tuple[int, int, int], str]] = {
    'red_disc':          ('disc',     (215, 30, 30),   'light'),
    'green_square':      ('square',   (30, 160, 50),   'light'),
    'blue_triangle':     ('triangle', (40, 70, 225),   'light'),
    'yellow_ring':       ('ring',     (245, 210, 30),  'dark'),
    'magenta_stripes':   ('stripes',  (215, 45, 185),  'dark'),
    'cyan_checker':      ('checker',  (40, 205, 215),  'dark'),
    'orange_cross':      ('cross',    (245, 130, 20),  'dark'),
    'white_star':        ('star',     (245, 245, 245), 'navy'),
}
RESO = 32
TILT = math.radians(15)         # squares, triangles, crosses and stars stand upright within +-15 degrees


class DemoDataError(UserError):
    """The demo data folder cannot be written or read; the message says what to do."""


def _jitter(rgb, rng: np.random.Generator, amount: int = 15) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_image(class_name: str, rng: np.random.Generator, reso: int = RESO) -> Image.Image:
    """One image of ``class_name`` drawn with ``rng``: drawn at 4x and downsampled (smooth edges), plus a little noise.

    What varies: the shape's position (centre within the middle fifth of the image), size (radius 26-34 % of the side),
    tilt (+-15 degrees), shade (+-15 per channel), the background's grey level, and the stripes' and the checkerboard's
    shift (the edges fall on the tokenizer's 4 px grid at 32 px: textures that never line up with the tokens are
    beyond a tiny generator trained for minutes)."""
    shape, colour, bg = CLASSES[class_name]
    S = reso * 4
    colour = _jitter(colour, rng)
    if bg == 'navy':
        back = _jitter((25, 35, 110), rng, 10)
    else:
        g = int(rng.integers(205, 236)) if bg == 'light' else int(rng.integers(20, 51))
        back = _jitter((g, g, g), rng, 6)
    img = Image.new('RGB', (S, S), back)
    d = ImageDraw.Draw(img)
    cx, cy = rng.uniform(0.4, 0.6, 2) * S
    r = rng.uniform(0.26, 0.34) * S
    tilt = rng.uniform(-TILT, TILT)

    def poly(n, radius, rot, radii=None):
        """A regular n-gon (or a star: ``radii`` alternates per vertex) with its first vertex pointing up."""
        pts = []
        for k in range(n):
            a = rot - math.pi / 2 + 2 * math.pi * k / n
            rk = radius * (radii[k % len(radii)] if radii else 1.0)
            pts.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
        return pts

    if shape == 'disc':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'square':
        d.polygon(poly(4, r * 1.2, tilt + math.pi / 4), fill=colour)
    elif shape == 'triangle':
        cy += 0.2 * r                       # the centroid sits low in a triangle: centre its bounding box instead
        d.polygon(poly(3, r * 1.35, tilt), fill=colour)
    elif shape == 'ring':
        w = r * rng.uniform(0.38, 0.48)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=back)
    elif shape == 'cross':
        w = r * 0.38
        for a in (tilt, tilt + math.pi / 2):
            dx, dy = math.cos(a) * r * 1.15, math.sin(a) * r * 1.15
            px, py = -math.sin(a) * w, math.cos(a) * w
            d.polygon([(cx - dx + px, cy - dy + py), (cx + dx + px, cy + dy + py),
                       (cx + dx - px, cy + dy - py), (cx - dx - px, cy - dy - py)], fill=colour)
    elif shape == 'star':
        d.polygon(poly(10, r * 1.3, tilt, radii=(1.0, 0.45)), fill=colour)
    elif shape == 'stripes':        # two level stripes, each a quarter of the side, the top one or the second first
        yy = np.mgrid[0:S, 0:S][0].astype(np.float32)
        on = ((yy / (S / 2) + int(rng.integers(0, 2)) / 2) % 1.0) < 0.5
        arr = np.where(on[..., None], np.array(colour, np.float32), np.array(back, np.float32))
        img = Image.fromarray(arr.astype(np.uint8))
    elif shape == 'checker':        # a 4 x 4 board, shifted by a multiple of an eighth of the side
        cell = S / 4
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        ox, oy = rng.integers(0, 2, 2) * cell / 2
        on = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0
        arr = np.where(on[..., None], np.array(colour, np.float32), np.array(back, np.float32))
        img = Image.fromarray(arr.astype(np.uint8))
    else:
        raise ValueError(shape)
    img = img.resize((reso, reso), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (reso, reso, 3))     # a little sensor noise
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


def dataset_reso(root) -> Optional[int]:
    """The image side of the finished demo dataset in ``root`` (its ``.complete`` marker), None when there is none."""
    try:
        reso = json.loads((Path(root) / '.complete').read_text()).get('reso')
    except (OSError, ValueError, AttributeError):
        return None
    return reso if isinstance(reso, int) else None


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
        raise DemoDataError(f'cannot write the demo dataset under {root}: {e.strerror or e}; '
                            f'pass a writable folder') from e
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
                arr = np.asarray(im.convert('RGB'), dtype=np.float32)
                imgs.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1)
            labels.append(c)
    if not imgs:
        raise DemoDataError(f'{folder} holds no class folders with PNG images')
    return torch.stack(imgs), torch.tensor(labels), names
