"""Class-conditional images from a VAR, VIAR or FlexVAR checkpoint, one PNG per (class, seed), optionally a grid.

    python gen_img.py --use_implicit --save_grid              # the published VIAR, class 970, seeds 10..19
    python gen_img.py --depth 16 --class_label 207 88 --seeds 0 1 2 3 --save_grid --nrow 4   # VAR-d16
    python gen_img.py --var_ckpt FLEXVAR.pth --infer_pn 512 --cfg 3.0 --top_p 0.95 --save_grid   # ckpts/README.md

Images go to ``<output_dir>/<checkpoint name>/class{c}_seed{s}.png`` (FlexVAR: ``<checkpoint name>-pn{schedule}/``)
and the grid next to them.  Every image is one sampler call with ``B = 1`` and ``g_seed = s``, as in the official
script, so an image does not depend on the other classes or seeds asked for.  Missing published checkpoints are
downloaded; ``--pretrained DIR_OR_REPO`` takes both models from a hub folder.  Every flag is checked before a model
loads; a problem ends with one line and status 1.  Details: docs/sampling_evaluation.md ("Generating images").
"""
import argparse
import os
from collections.abc import Sequence

import torch
import torchvision

from models.checkpoint import describe_classes
from utils.errors import run_cli
from utils.flags import BOOL
from utils.misc import save_png_atomic
from utils.sampling_utils import (
    add_common_args,
    add_var_ckpt_arg,
    check_args,
    check_output_dir,
    dtype_name,
    guard_writes,
    load_chosen,
    make_output_dir,
    sample_batch,
    sampler_kwargs,
    schedule_name,
    setup_device,
    to_uint8,
)

PROG = 'gen_img.py'


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_var_ckpt_arg(p, 'VAR/VIAR/FlexVAR', ', depth 30 when not given')
    p.add_argument('--class_label', type=str, nargs='+', default=['970'],
                   help='one or several classes: indices (ImageNet for the published files), or the class folder names '
                        'a train.py checkpoint records (e.g. cats)')
    p.add_argument('--seeds', type=int, nargs='+', default=list(range(10, 20)), help='one image per seed and class')
    p.add_argument('--output_dir', type=str, default='gen_images')
    p.add_argument('--save_grid', default=False, help='also write all images as one grid', **BOOL)
    p.add_argument('--nrow', type=int, default=4, help='images per grid row')
    add_common_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python gen_img.py ARGV``: generates (``generate``); the exit status (1 after one error line, 130 Ctrl-C)."""
    return run_cli(lambda: generate(parse_args(argv)), PROG,
                   interrupted='interrupted; the images written so far are kept')


def grid_name(labels: Sequence[int], seeds: Sequence[int]) -> str:
    seeds_str = '_'.join(map(str, seeds[:4])) + (f'_etc{len(seeds)}' if len(seeds) > 4 else '')
    return f"class{'_'.join(map(str, labels))}_seeds{seeds_str}_grid.png"


def generate(args: argparse.Namespace) -> None:
    check_args(args)
    check_output_dir(args.output_dir, '--output_dir')
    device, amp_dtype = setup_device(args)
    with guard_writes('the images written so far are kept'):
        _generate(args, device, amp_dtype)


def _generate(args: argparse.Namespace, device: torch.device, amp_dtype) -> None:
    _, var, source, name = load_chosen(args, device, 30)
    kw = sampler_kwargs(args, var)
    kind = var.describe() + (f', iterations {args.iter_left}->{args.iter_right}' if var.use_implicit else '')
    kind += f', iter_tol {args.iter_tol:g}' if var.use_implicit and args.iter_tol is not None else ''
    kind += ''.join(f', {k} {kw[k]}' for k in ('iter_exit', 'iter_solver', 'anderson_m', 'anderson_beta', 'warm_start')
                    if var.use_implicit and k in kw)
    if 'infer_patch_nums' in kw:        # FlexVAR: the schedule decides the size (and the images)
        pns = kw['infer_patch_nums']
        kind += (f', schedule {schedule_name(pns)} ({len(pns)} steps, {var.vae_proxy[0].downsample * pns[-1]} px), '
                 f'max_pn {kw["max_pn"]}{", LlamaGen guidance" if kw["used_llamagen_cfg"] else ""}')
        name += f'-pn{schedule_name(pns)}'
    out_dir = os.path.join(args.output_dir, name)
    make_output_dir(out_dir)
    if getattr(var, 'class_names', None):
        print(f'[gen_img] classes of {source}: {describe_classes(var.class_names)}', flush=True)
    print(f'[gen_img] {source} ({kind}); classes {args.class_label}, seeds {args.seeds}, cfg {args.cfg}, '
          f'top_k {kw["top_k"]}, top_p {args.top_p}; {dtype_name(amp_dtype)} on {device.type} -> {out_dir}/',
          flush=True)

    imgs = []
    for c in args.class_label:
        for s in args.seeds:
            label_B = torch.tensor([c], dtype=torch.long, device=device)
            img_B3HW = sample_batch(var, label_B, s, kw, amp_dtype)
            save_png_atomic(to_uint8(img_B3HW)[0], os.path.join(out_dir, f'class{c}_seed{s}.png'))
            imgs.append(img_B3HW)
    print(f'[gen_img] saved {len(imgs)} images to {out_dir}')

    if args.save_grid:
        grid_3HW = torchvision.utils.make_grid(torch.cat(imgs, dim=0), nrow=args.nrow, padding=2, pad_value=1.0)
        path = os.path.join(out_dir, grid_name(args.class_label, args.seeds))
        save_png_atomic(to_uint8(grid_3HW.unsqueeze(0))[0], path)
        print(f'[gen_img] saved grid to {path}')


if __name__ == '__main__':
    raise SystemExit(main())
