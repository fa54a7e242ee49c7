"""Zero-shot editing inputs: the image to edit, the region to generate (a box or a mask image) on the token grid, and
a picture of that region.  ``scripts/edit.py`` is built from these; ``VAR.autoregressive_infer_cfg(...,
input_img_tokens=vae.img_to_idxBl(img), edit_mask=keep_hw)`` does the editing itself.

Geometry: an input image of any size is resized so that its shorter side is the model's resolution (LANCZOS, as the
data pipeline), then centre-cropped to a square (``fit_square``).  A mask image gets the same resize and crop, so it
can be drawn on the input image at any size of the same aspect ratio; its white pixels (grey level >= 128) are the
region to generate.  A token of the last scale's grid is generated when more than half of its patch is white, else
it keeps the input's token; for a box this is the grid of ``models.get_edit_mask`` (its ``round(y0 * pn)`` rule).

Every user-fixable problem is an ``EditError`` (a ``utils.errors.UserError``): one sentence saying what to do.
"""
import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.data import to_rgb
from utils.errors import UserError

__all__ = ['EditError', 'load_image', 'fit_square', 'image_to_uint8', 'image_to_tensor', 'square_input', 'parse_box',
           'check_box', 'check_region', 'check_same_aspect', 'edit_mask_from_image', 'masked_preview',
           'ASPECT_TOLERANCE']

# mask and input image may differ this much in aspect ratio (relative), e.g. one pixel of rounding in a resized copy
ASPECT_TOLERANCE = 0.01

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class EditError(UserError):
    """A bad editing input (image, box, mask, class); the message says what to do."""


# ================================ images ==============================================================================
def load_image(path: Union[str, os.PathLike], flag: str = '--input_img', mode: str = 'RGB') -> Image.Image:
    """The decoded image at ``path`` in ``mode``, as it looks (EXIF orientation applied; a 16-bit image scaled to 8
    bits: ``utils.data.to_rgb``); a missing, unreadable or non-image file is one EditError line."""
    if os.path.isdir(path):
        raise EditError(f'{flag} {str(path)!r} is a folder, not an image file: pass an image (PNG, JPEG, ...)')
    if not os.path.isfile(path):
        raise EditError(f'{flag} {str(path)!r} does not exist: check the path')
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im).convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = ' '.join(str(e).split()) or type(e).__name__
        raise EditError(f'{flag} {str(path)!r} cannot be read as an image ({why}): pass a PNG, JPEG or other image '
                        f'file') from e


def _fit_geometry(w: int, h: int, size: int) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
    """(resized (w, h), crop box (left, top, right, bottom)) that take a w x h image to size x size: the shorter side
    becomes ``size``, then the centre square is cut out."""
    if w <= h:
        rw, rh = size, max(size, round(h * size / w))
    else:
        rw, rh = max(size, round(w * size / h)), size
    left, top = (rw - size) // 2, (rh - size) // 2
    return (rw, rh), (left, top, left + size, top + size)


def fit_square(img: Image.Image, size: int, resample=Image.LANCZOS) -> Image.Image:
    """``img`` resized on its shorter side to ``size`` and centre-cropped to size x size."""
    (rw, rh), box = _fit_geometry(img.width, img.height, size)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample=resample)
    return img.crop(box) if img.size != (size, size) else img


def image_to_uint8(img: Image.Image) -> torch.Tensor:
    """The pixels (3, H, W) uint8 of an image, as RGB."""
    return torch.from_numpy(np.asarray(img.convert('RGB'), dtype=np.uint8).copy()).permute(2, 0, 1)


def _uint8_to_input(u8_3HW: torch.Tensor) -> torch.Tensor:
    return u8_3HW.unsqueeze(0).float().div_(127.5).sub_(1)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1] of an RGB image (``u8 / 127.5 - 1``, the tokenizer's input range)."""
    return _uint8_to_input(image_to_uint8(img))


def square_input(img: Image.Image, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``img`` fitted to a size x size square (``fit_square``): (its pixels (3, size, size) uint8, the tokenizer's
    input (1, 3, size, size) in [-1, 1] made of them)."""
    u8_3HW = image_to_uint8(fit_square(img, size))
    return u8_3HW, _uint8_to_input(u8_3HW)


# ================================ the region to generate ==============================================================
def check_box(box: Sequence[float], flag: str = '--box') -> Tuple[float, float, float, float]:
    """(y0, x0, y1, x1) as floats: four finite fractions in [0, 1] with y0 < y1 and x0 < x1."""
    if len(box) != 4:
        raise EditError(f'{flag} needs four fractions y0,x0,y1,x1 (top, left, bottom, right), got {len(box)} numbers')
    y0, x0, y1, x1 = (float(v) for v in box)
    shown = ','.join(f'{v:g}' for v in (y0, x0, y1, x1))
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (y0, x0, y1, x1)):
        raise EditError(f'{flag} {shown} is outside the image: every fraction must be in [0, 1] '
                        f'(y0,x0 = top-left corner, y1,x1 = bottom-right corner)')
    if not (y0 < y1 and x0 < x1):
        raise EditError(f'{flag} {shown} is empty: the bottom-right corner (y1,x1) must lie below and right of the '
                        f'top-left corner (y0,x0)')
    return y0, x0, y1, x1


def parse_box(text: str, flag: str = '--box') -> Tuple[float, float, float, float]:
    """``'y0,x0,y1,x1'`` (fractions of the image side) checked by ``check_box``."""
    try:
        values = [float(v) for v in text.replace(' ', '').split(',')]
    except ValueError as e:
        raise EditError(f'{flag} {text!r} is not four numbers: write y0,x0,y1,x1 as fractions, e.g. 0.25,0.25,0.75,0.75'
                        ) from e
    return check_box(values, flag)


def check_region(keep_hw: torch.Tensor, what: str) -> torch.Tensor:
    """``keep_hw`` (1 = keep) when it leaves at least one token of the grid to generate, else one EditError line."""
    if bool((keep_hw > 0.5).all()):
        h, w = keep_hw.shape[-2:]
        raise EditError(f'{what} leaves no token of the {h}x{w} token grid to generate (a token is 1/{w} of the '
                        f'side): make the region to generate larger')
    return keep_hw


def _mask_array(mask: ImageLike, flag: str) -> Tuple[np.ndarray, str]:
    """(grey levels (H, W) float32 in [0, 1], a name for messages) of a mask path, PIL image, array or tensor."""
    if isinstance(mask, (str, os.PathLike)):
        return np.asarray(load_image(mask, flag, mode='L'), dtype=np.float32) / 255.0, f'{flag} {str(mask)!r}'
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert('L'), dtype=np.float32) / 255.0, 'the mask'
    a = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise EditError(f'a mask array must be (H, W), got shape {tuple(np.shape(mask))}')
    if a.size and a.max() > 1:      # 0..255 grey levels
        a = a / 255.0
    return a.astype(np.float32), 'the mask'


def check_same_aspect(mask_size: Tuple[int, int], image_size: Tuple[int, int], mask_name: str = 'the mask',
                      image_name: str = 'the input image') -> None:
    """One EditError line when a mask (width, height) has another aspect ratio than its image (width, height)."""
    (w, h), (iw, ih) = mask_size, image_size
    if abs(math.log((w / h) / (iw / ih))) > ASPECT_TOLERANCE:
        raise EditError(f'{mask_name} is {w}x{h} (aspect ratio {w / h:.3f}) but {image_name} is {iw}x{ih} (aspect '
                        f'ratio {iw / ih:.3f}): draw the mask on the input image (any size of the same aspect ratio)')


def edit_mask_from_image(mask: ImageLike, grid: int, image_size: Optional[Tuple[int, int]] = None,
                         flag: str = '--mask', image_name: str = 'the input image') -> torch.Tensor:
    """The keep-mask (grid, grid) float32 (1 = keep the input's token, 0 = generate) of a mask image of any size whose
    white (grey >= 0.5) pixels are the region to generate.

    ``image_size``: (width, height) of the input image the mask was drawn on; the mask must have its aspect ratio
    (within ``ASPECT_TOLERANCE``) and gets the same shorter-side resize and centre crop as the image (``fit_square``).
    Without it the mask's own centre square is used.  A token is generated where more than half of its patch is white.
    """
    a, name = _mask_array(mask, flag)
    h, w = a.shape
    if h == 0 or w == 0:
        raise EditError(f'{name} is empty (0 pixels)')
    if image_size is not None:
        check_same_aspect((w, h), image_size, name, image_name)
        iw, ih = image_size
    else:
        iw, ih = w, h
    white = Image.fromarray(np.ascontiguousarray(a >= 0.5, dtype=np.float32))      # mode 'F'
    # the image's geometry in the mask's pixels: resized as the image (box filter: exact area averages), same crop
    side = grid * 16        # a working resolution that is a multiple of the grid
    (rw, rh), crop = _fit_geometry(iw, ih, side)
    white = white.resize((rw, rh), resample=Image.BOX).crop(crop)
    frac = F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(white, dtype=np.float32).copy())[None, None],
                                 (grid, grid))[0, 0]
    return (frac <= 0.5).float()


def masked_preview(img_3HW: torch.Tensor, keep_hw: torch.Tensor) -> torch.Tensor:
    """The input (3, H, W) in [0, 1] with the region to generate (keep = 0 on the token grid) greyed and hatched."""
    H, W = img_3HW.shape[-2:]
    gen = F.interpolate((1 - keep_hw.float().cpu())[None, None], size=(H, W), mode='nearest')[0, 0].bool()
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    hatch = ((yy + xx) % max(8, H // 32)) < max(2, H // 128)
    out = img_3HW.float().cpu().clone()
    grey = out * 0.35 + 0.5 * 0.65
    out = torch.where(gen, grey, out)
    return torch.where(gen & hatch, torch.full_like(out, 0.15), out)
