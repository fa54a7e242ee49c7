"""Checkpoint pair <-> hub folder (``config.json`` + ``model.safetensors`` + ``README.md``), with a parity check.

    python -m scripts.convert --var_ckpt ckpts/<published file> --out hub/viar --training_data "ImageNet-1k train"
    python -m scripts.convert --var_ckpt local_output/ar-ckpt-last.pth --vae_ckpt vae.pth --out hub/my-viar
    python -m scripts.convert --pretrained hub/viar --out_var var.pth --out_vae vae.pth      # and back

To a hub folder: the transformer (a published ``.pth`` or a ``train.py`` checkpoint ``ar-ckpt-*.pth``) and its
tokenizer (``--vae_ckpt``; default: the published one of the model's kind) are loaded as the sampling scripts load
them (published files at their default place downloaded when missing) and written with ``models.save_pretrained``;
the sampler flags (``--cfg``, ``--top_k``, ``--iter_left`` ...) are recorded as the folder's sampling defaults.
Back: ``--pretrained DIR_OR_REPO`` is written as bare state dicts, as published (docs/families.md, "Hub folders").

At the end both sides sample ``--parity_images`` images (classes 0, 1, ...; ``g_seed = --parity_seed``; the
recorded sampling defaults) and the script prints whether they are identical; a difference ends with status 1.
"""
import argparse
import os
from typing import Optional, Sequence

import torch

from models.checkpoint import load_vae_var
from models.flexvae import FLEX_PATCH_NUMS, FlexVAE
from models.flexvar import FlexVAR
from models.hub import HUB_FILES, save_pretrained
from utils.errors import UserError, run_cli
from utils.misc import save_atomic
from utils.model_io import hub_sampler_settings, model_errors
from utils.sampling_utils import (
    SamplerSettings,
    add_flex_args,
    add_model_args,
    add_sampler_args,
    check_args,
    load_models,
    load_pretrained,
    sample_batch,
)

PROG = 'scripts.convert'


class ConvertError(UserError):
    """A bad flag, or a conversion whose parity check failed."""


def parity(a, b, n: int, seed: int, settings: SamplerSettings) -> str:
    """Samples ``n`` images (classes 0, 1, ... modulo the model's classes, ``g_seed = seed``) from the transformers
    ``a`` and ``b`` (fp32); raises ConvertError unless they are identical.  Returns the line to print."""
    labels = torch.arange(n) % a.num_classes
    kw_a, kw_b = settings.kwargs(a), settings.kwargs(b)
    img_a = sample_batch(a, labels.to(next(a.parameters()).device), seed, kw_a, None).float().cpu()
    img_b = sample_batch(b, labels.to(next(b.parameters()).device), seed, kw_b, None).float().cpu()
    diff = (img_a - img_b).abs().max().item()
    if kw_a != kw_b or not torch.equal(img_a, img_b):
        raise ConvertError(f'parity check failed: the {n} images of g_seed {seed} differ (max |diff| {diff:.3g})')
    return (f'[convert] parity check: {n} image(s) {tuple(img_a.shape[1:])} of classes {labels.tolist()} from g_seed '
            f'{seed} are identical before and after the conversion')


def to_hub(args, device) -> str:
    vae, var = load_models(args, device, args.var_ckpt)
    settings = SamplerSettings.from_namespace(args)
    card = {k: v for k, v in (('name', args.name), ('training_data', args.training_data)) if v}
    card['converted_from'] = f'{os.path.basename(args.var_ckpt)} + {os.path.basename(args.vae_ckpt)}'
    with model_errors():
        save_pretrained(vae, var, args.out, sampler=settings.to_dict(), **card)
    print(f'[convert] {args.var_ckpt} + {args.vae_ckpt} ({var.describe()}) -> {args.out}/ ({", ".join(HUB_FILES)})',
          flush=True)
    from models.hub import from_pretrained
    with model_errors():
        _, var2 = from_pretrained(args.out, device=device)
    return parity(var, var2, args.parity_images, args.parity_seed, settings)


def from_hub(args, device) -> str:
    vae, var = load_pretrained(args, device)
    settings = hub_sampler_settings(args.pretrained_dir)
    save_atomic({'model': vae.state_dict()} if isinstance(vae, FlexVAE) else vae.state_dict(), args.out_vae)
    sd = var.state_dict()
    if isinstance(var, FlexVAR) and tuple(var.patch_nums) != tuple(FLEX_PATCH_NUMS):
        save_atomic({'trainer': {'var_wo_ddp': sd, 'config': {'patch_nums': list(var.patch_nums)}}}, args.out_var)
    else:
        save_atomic(sd, args.out_var)
    print(f'[convert] {args.pretrained} ({var.describe()}) -> {args.out_var} + {args.out_vae}', flush=True)
    with model_errors():
        _, var2 = load_vae_var(args.out_vae, args.out_var, device=device)
    return parity(var, var2, args.parity_images, args.parity_seed, settings)


def run(args) -> None:
    check_args(args)
    if args.pretrained:
        if not (args.out_var and args.out_vae):
            raise ConvertError('--pretrained converts a hub folder back: pass --out_var FILE.pth and --out_vae '
                               'FILE.pth')
        if args.out:
            raise ConvertError('--out writes a hub folder from --var_ckpt; with --pretrained pass --out_var/--out_vae')
    elif not (args.var_ckpt and args.out):
        raise ConvertError('pass --var_ckpt CKPT (and --vae_ckpt) with --out DIR, or --pretrained DIR_OR_REPO with '
                           '--out_var/--out_vae')
    if args.parity_images < 0:
        raise ConvertError(f'--parity_images {args.parity_images} must be >= 0')
    device = torch.device(args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu'))
    line = from_hub(args, device) if args.pretrained else to_hub(args, device)
    print(line if args.parity_images else '[convert] parity check skipped (--parity_images 0)', flush=True)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m scripts.convert', description=__doc__.split('\n\n')[0],
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--var_ckpt', default=None, help='transformer checkpoint (.pth, published or ar-ckpt-*.pth)')
    p.add_argument('--out', default=None, help='hub folder to write (new or empty)')
    p.add_argument('--out_var', default=None, help='with --pretrained: the transformer state dict to write')
    p.add_argument('--out_vae', default=None, help='with --pretrained: the tokenizer state dict to write')
    p.add_argument('--name', default=None, help='model card: the name (default: the folder name)')
    p.add_argument('--training_data', default=None, help='model card: what the model was trained on')
    p.add_argument('--parity_images', type=int, default=2, help='images of the parity check (0: skip it)')
    p.add_argument('--parity_seed', type=int, default=0, help='g_seed of the parity check')
    p.add_argument('--device', default='cpu', choices=['auto', 'cpu', 'cuda'])
    add_model_args(p)
    p.set_defaults(use_implicit=None)       # the kind is read from the file; --use_implicit only checks it
    g = p.add_argument_group('sampling defaults recorded in the hub folder')
    add_sampler_args(g)
    add_flex_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status of ``python -m scripts.convert ARGV``: 0, or 1 after one error line."""
    parser = get_parser()
    return run_cli(lambda: run(parser.parse_args(argv)), PROG)


if __name__ == '__main__':
    raise SystemExit(main())
