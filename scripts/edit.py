"""Zero-shot editing with a VAR or VIAR checkpoint: in-painting, out-painting and class-conditional editing.

    python -m scripts.edit --input_img photo.jpg --box 0.1,0.1,0.8,0.8           # in-paint the box (VAR-d36, 512 px)
    python -m scripts.edit --input_img photo.jpg --box 0.25,0.25,0.75,0.75 --outpaint     # keep the box only
    python -m scripts.edit --input_img photo.jpg --mask mask.png --class_label 207   # white region -> class 207
    python -m scripts.edit --use_implicit --input_img a.png b.png --box 0,0.5,1,1 --seeds 0 1 2   # VIAR (256 px)

The model keeps the input image's tokens outside the region to generate and samples the rest, scale by scale (the
official notebook ``demo_zero_shot_edit.ipynb``): the kept positions of every scale are teacher-forced with the
input's tokens.  Each result is one sampler call with ``B = 1`` and ``g_seed = seed``, written to
``<output_dir>/<checkpoint name>/`` with one grid per input image.  Details: docs/editing.md.
"""
import os
import sys

if __package__ in (None, ''):       # run as a file (python scripts/X.py): the repository's modules come first
    import _repo_path  # noqa: F401

import argparse
from typing import List, Optional, Sequence

import torch
import torchvision

from models import get_edit_mask
from utils.editing import (
    EditError,
    check_region,
    check_same_aspect,
    edit_mask_from_image,
    load_image,
    masked_preview,
    parse_box,
    square_input,
)
from utils.errors import run_cli
from utils.flags import BOOL
from utils.misc import save_png_atomic
from utils.sampling_utils import (
    add_common_args,
    add_var_ckpt_arg,
    check_args,
    check_output_dir,
    dtype_name,
    load_chosen,
    make_output_dir,
    sample_batch,
    sampler_kwargs,
    setup_device,
    to_uint8,
)

PROG = 'scripts/edit.py'      # the one name of every message (python scripts/edit.py or python -m scripts.edit)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0],
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--input_img', type=str, nargs='+', required=True,
                   help='image(s) to edit, any size (shorter side resized to the model resolution, centre crop)')
    region = p.add_mutually_exclusive_group(required=True)
    region.add_argument('--box', type=str, default=None, metavar='Y0,X0,Y1,X1',
                        help='region as fractions of the side (top, left, bottom, right): generated, or kept with '
                             '--outpaint')
    region.add_argument('--mask', type=str, default=None,
                        help='mask image of the input\'s aspect ratio (any size): white = generate, black = keep')
    p.add_argument('--outpaint', default=False, help='out-painting: keep the --box, generate the rest', **BOOL)
    p.add_argument('--class_label', type=str, nargs='+', default=None,
                   help='class-conditional editing to these classes: indices, or the class folder names a train.py '
                        'checkpoint records (default: unconditional in/out-painting)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3], help='one result per seed (and class)')
    add_var_ckpt_arg(p, 'VAR/VIAR', ' with depth 36, the 512 px model the notebook recommends')
    p.add_argument('--output_dir', type=str, default='edit_images')
    add_common_args(p)
    # the notebook's editing call: cfg 3, top-k 900, top-p 0.95, more_smooth
    p.set_defaults(cfg=3.0, top_k=900, top_p=0.95, more_smooth=True)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags; ``--box -0.2,0,1,1`` (a value starting with a minus sign, which argparse would take for a flag) is
    read as ``--box=-0.2,0,1,1`` and then refused by the range check, not by argparse."""
    given, argv = list(sys.argv[1:] if argv is None else argv), []
    while given:
        a = given.pop(0)
        if a == '--box' and given and given[0][:1] == '-' and given[0][1:2] in tuple('0123456789.'):
            a = f'--box={given.pop(0)}'
        argv.append(a)
    return get_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Everything that needs neither the images nor the model, before anything is read."""
    if args.box is not None:
        args.box = parse_box(args.box)
    elif args.outpaint:
        raise EditError('--outpaint keeps a --box; with --mask paint the region to generate in white instead')
    check_args(args)
    check_output_dir(args.output_dir, '--output_dir')


def output_stems(paths: Sequence[str]) -> List[str]:
    """File-name stem of each input; repeated stems get their position (``a``, ``a-2`` ...)."""
    stems, seen = [], {}
    for p in paths:
        s = os.path.splitext(os.path.basename(p))[0] or 'image'
        seen[s] = seen.get(s, 0) + 1
        stems.append(s if seen[s] == 1 else f'{s}-{seen[s]}')
    return stems


def edit(args: argparse.Namespace) -> None:
    check_flags(args)
    images = [load_image(p, '--input_img') for p in args.input_img]
    mask = None
    if args.mask is not None:
        mask = load_image(args.mask, '--mask', mode='L')
        for path, im in zip(args.input_img, images):
            check_same_aspect(mask.size, im.size, f'--mask {args.mask!r}', f'--input_img {path!r}')

    device, amp_dtype = setup_device(args)
    vae, var, source, name = load_chosen(args, device, 36)
    grid = var.patch_nums[-1]
    reso = grid * vae.downsample
    region = 'mask' if mask is not None else ('outpaint' if args.outpaint else 'inpaint')
    if args.box is not None:      # the keep-mask (grid, grid) of every input, all checked before any sampling
        shown = f'--box {",".join(f"{v:g}" for v in args.box)}' + (' with --outpaint' if args.outpaint else '')
        keep = check_region(get_edit_mask(var.patch_nums, *args.box, inpainting=not args.outpaint), shown)
        keeps = [keep] * len(images)
    else:
        keeps = [check_region(edit_mask_from_image(mask, grid, image_size=im.size, flag='--mask'),
                              f'--mask {args.mask!r} on --input_img {path!r}')
                 for path, im in zip(args.input_img, images)]
    classes = args.class_label or [None]
    kw = sampler_kwargs(args, var)

    out_dir = os.path.join(args.output_dir, name)
    make_output_dir(out_dir, EditError)
    iters = f', iterations {args.iter_left}->{args.iter_right}' if var.backbone.is_implicit else ''
    what = 'unconditional' if args.class_label is None else f'class {" ".join(map(str, args.class_label))}'
    print(f'[edit] {source} ({var.describe()}{iters}, {reso} px, {grid}x{grid} tokens); {region}, {what}, '
          f'seeds {args.seeds}, cfg {args.cfg}, top_k {kw["top_k"]}, top_p {args.top_p}, more_smooth '
          f'{kw["more_smooth"]}; {dtype_name(amp_dtype)} on {device.type} -> {out_dir}/', flush=True)

    for path, im, keep, stem in zip(args.input_img, images, keeps, output_stems(args.input_img)):
        orig, x = square_input(im, reso)        # (3, H, W) uint8 and the tokenizer's input
        with torch.inference_mode():
            tokens = vae.img_to_idxBl(x.to(device), var.patch_nums)     # in fp32, outside autocast (as the notebook)
        preview = masked_preview(orig.float() / 255, keep).mul(255).round().to(torch.uint8)
        tiles = [orig, preview]     # the grid is made of the PNGs' own bytes
        classes_str = '' if args.class_label is None else '_class' + '_'.join(map(str, args.class_label))
        grid_name = f'{stem}_{region}{classes_str}'
        for c in classes:
            label_B = torch.tensor([var.num_classes if c is None else c], dtype=torch.long, device=device)
            for s in args.seeds:
                img_B3HW = sample_batch(var, label_B, s, dict(kw, input_img_tokens=tokens, edit_mask=keep.to(device)),
                                        amp_dtype)
                res = f'{stem}_{region}' + ('' if c is None else f'_class{c}') + f'_seed{s}.png'
                res_HW3 = to_uint8(img_B3HW)[0]
                save_png_atomic(res_HW3, os.path.join(out_dir, res))
                tiles.append(torch.from_numpy(res_HW3).permute(2, 0, 1))
        grid_3HW = torchvision.utils.make_grid(torch.stack(tiles), nrow=len(tiles), padding=2, pad_value=255)
        grid_path = os.path.join(out_dir, f'{grid_name}_grid.png')
        save_png_atomic(grid_3HW.permute(1, 2, 0).contiguous().numpy(), grid_path)
        print(f'[edit] {path}: {len(tiles) - 2} results, grid {grid_path}', flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    def run():
        try:
            edit(parse_args(argv))
        except OSError as e:    # disk full, permissions ...
            raise EditError(f'{e}; the images written so far are kept') from e
    return run_cli(run, PROG, interrupted='interrupted; the images written so far are kept')


if __name__ == '__main__':
    raise SystemExit(main())
