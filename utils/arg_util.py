"""Command-line flags of ``train.py`` and ``train_vae.py``, and the values derived from them.

Every flag of the official VAR / VIAR recipe keeps its name and default.  Booleans accept ``--flag``,
``--flag=True``, ``--flag True`` and the ``False`` forms (the official VIAR scripts parsed ``--x False`` as True).
"""
import argparse
import math
import os
from typing import List, Optional, Sequence

from utils.flags import BOOL, VAR_SCALE_PRESETS, Parser, parse_scales, str2bool
from utils.zoo import FLEX_TOKENIZER, VAR_TOKENIZER, default_path

__all__ = ['get_parser', 'parse_args', 'get_vae_parser', 'parse_vae_args', 'str2bool',
           'parse_patch_nums', 'default_workers']

VAR_VAE, FLEX_VAE = default_path(VAR_TOKENIZER), default_path(FLEX_TOKENIZER)     # train.py's default tokenizers


def parse_patch_nums(pn: str) -> List[int]:
    """``--pn``: a preset of ``VAR_SCALE_PRESETS`` ('256' | '512') or sides like 1_2_3_4_... -> increasing list."""
    try:
        return list(parse_scales(pn, VAR_SCALE_PRESETS))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--pn must be '256', '512' or scale sides like 1_2_3_4_5_6_8_10_13_16 "
                                         f"(positive, increasing), got {pn!r}") from e


def default_workers() -> int:
    """DataLoader workers per rank when ``--workers`` is not given: min(8, CPUs per local rank), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))))


def _finite(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    return lambda v: math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


# flag -> (test, what a valid value is): the numeric flags of the trainers, checked before anything is written
TRAIN_RANGES = {
    'tblr': (_finite(0, lo_open=True), 'a finite number > 0'),
    'twd': (_finite(0), 'a finite number >= 0'),
    'twde': (_finite(0), 'a finite number >= 0 (0: = --twd)'),
    'tclip': (_finite(), 'a finite number (<= 0: no clipping)'),
    'ls': (_finite(0, 1, hi_open=True), 'in [0, 1)'),
    'wp': (_finite(0), 'a finite number of epochs >= 0 (0: --ep / 50)'),
    'wp0': (_finite(0), 'a finite lr ratio >= 0'),
    'wpe': (_finite(0), 'a finite lr ratio >= 0'),
    'aln': (_finite(), 'a finite number'),
    'alng': (_finite(), 'a finite number'),
    'hd': (_finite(), 'a finite number'),
    'ini': (_finite(), 'a finite number (< 0: sqrt(1/3C))'),
    'mid_reso': (_finite(1), 'a finite number >= 1 (the resize before the crop must not be smaller than the image)'),
    'workers': (lambda v: v >= -1, '>= -1 (-1: one per CPU, up to 8; 0: in the training process)'),
    'log_freq': (lambda v: v >= 0, '>= 0 (0: ~10 per epoch)'),
}
VAE_RANGES = {
    'lr': (_finite(0, lo_open=True), 'a finite number > 0'),
    'wd': (_finite(0), 'a finite number >= 0'),
    'wp': (_finite(0), 'a finite number of epochs >= 0'),
    'lr_end': (_finite(0), 'a finite lr ratio >= 0'),
    'clip': (_finite(0), 'a finite number >= 0 (0: off)'),
    'beta': (_finite(0), 'a finite number >= 0'),
    'quant_resi': (_finite(), 'a finite number'),
    'disc_start': (_finite(0, 1), 'a fraction of training in [0, 1]'),
    **{k: (_finite(0), 'a finite number >= 0') for k in ('l1', 'l2', 'lp', 'disc', 'ms_weight')},
    'mid_reso': TRAIN_RANGES['mid_reso'],
    'workers': TRAIN_RANGES['workers'],
    'log_freq': TRAIN_RANGES['log_freq'],
    **{k: (lambda v: v >= 0, '>= 0') for k in ('threads', 'n_vis', 'ae_warmup', 'code_restart', 'share_quant_resi')},
    **{k: (lambda v: v >= 1, '>= 1') for k in ('disc_ch', 'max_nonfinite')},
}


def check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace, rules: dict):
    """Every numeric flag of ``rules`` checked at once; the bad ones end the run in one line (argparse's error)."""
    bad = [f'--{k} must be {rule}, got {getattr(args, k)}' for k, (ok, rule) in rules.items()
           if hasattr(args, k) and not ok(getattr(args, k))]
    if bad:
        p.error('; '.join(bad))


def get_parser() -> argparse.ArgumentParser:
    p = Parser(
        description='Train VAR, VIAR (--use_implicit), FlexVAR (--flex) or an implicit FlexVAR (--flex --use_implicit) '
                    'on an ImageNet-style folder with a frozen tokenizer. Rerunning the same command resumes from '
                    '<local_out_dir_path>/ar-ckpt-last.pth.',
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group('data')
    g.add_argument('--data_path', type=str, default='/path/to/imagenet',
                   help='folder holding train/<class>/<images> and val/<class>/<images>')
    g.add_argument('--num_classes', type=int, default=0, help='class embeddings (0: number of class folders in train/)')
    g.add_argument('--pn', type=str, default='1_2_3_4_5_6_8_10_13_16',
                   help="token-map sides per scale; '256' and '512' are aliases; image side = the tokenizer's "
                        "downsampling (16 for the published one) x the last side")
    _data_flags(g)

    g = p.add_argument_group('model')
    g.add_argument('--depth', type=int, default=16, help='nominal depth: width 64 x depth, depth heads')
    g.add_argument('--use_implicit', default=False, help='VIAR: p_depth pre + 1 implicit + p_depth post blocks', **BOOL)
    g.add_argument('--p_depth', type=int, default=5, help='VIAR pre and post blocks (each)')
    g.add_argument('--saln', default=False, help='shared AdaLN', **BOOL)
    g.add_argument('--anorm', default=True, help='L2-normalised attention', **BOOL)
    g.add_argument('--fuse', default=True, help='use fused / flash kernels when available', **BOOL)
    g.add_argument('--aln', type=float, default=0.5, help='AdaLN weight init multiplier')
    g.add_argument('--alng', type=float, default=1e-5, help='AdaLN gamma-rows init multiplier')
    g.add_argument('--hd', type=float, default=0.02, help='head weight init multiplier')
    g.add_argument('--ini', type=float, default=-1, help='init std (<0: sqrt(1/3C))')
    g.add_argument('--flex', default=False, help='FlexVAR (github jiaosiyu1999/FlexVAR): every step predicts the token '
                   'maps of a random schedule of scales (the official rule, drawn from the seeded generator all ranks '
                   'share), on its FlexVAE tokenizer; --use_implicit gives an implicit FlexVAR', **BOOL)
    g.add_argument('--vae_ckpt', type=str, default=None, help=f'frozen tokenizer checkpoint (default: {VAR_VAE}, with '
                   f'--flex {FLEX_VAE})')
    g.add_argument('--allow_other_vae', default=False, help='resume although --vae_ckpt holds other weights than the '
                   'tokenizer the checkpoint was trained with (the token targets, hence the losses, change)', **BOOL)

    g = p.add_argument_group('optimisation')
    _batch_and_epochs(g, 768, 'global batch size per optimiser step (all ranks, all accumulation steps)', 250)
    g.add_argument('--ac', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--tblr', type=float, default=1e-4, help='base lr; lr = tblr x bs / 256')
    g.add_argument('--twd', type=float, default=0.05, help='initial weight decay')
    g.add_argument('--twde', type=float, default=0.0, help='final weight decay (0: = twd); cosine from twd')
    g.add_argument('--tclip', type=float, default=2.0, help='grad-norm clipping (<=0: off)')
    g.add_argument('--ls', type=float, default=0.0, help='label smoothing')
    g.add_argument('--wp', type=float, default=0, help='warm-up epochs (0: ep/50)')
    g.add_argument('--wp0', type=float, default=0.005, help='lr ratio at the start of warm-up')
    g.add_argument('--wpe', type=float, default=0.01, help='lr ratio at the end of training')
    g.add_argument('--sche', type=str, default='lin0',
                   help='lr schedule after warm-up: lin0, lin, lin00, linX, cos, exp')
    g.add_argument('--fp16', type=int, default=0, choices=(0, 1, 2), help='0: fp32, 1: fp16 + GradScaler, 2: bf16')
    g.add_argument('--tf32', default=True, help='allow TF32 matmuls on CUDA', **BOOL)
    g.add_argument('--grad_ckpt', default=False, help='activation checkpointing: every block (and implicit step with '
                   'gradient) recomputes its activations in backward: far less memory, about 1/3 more compute, the '
                   'same gradients', **BOOL)

    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=None, help='seed (default: drawn once, then kept in the checkpoint)')
    g.add_argument('--device', type=str, default='auto', choices=('auto', 'cpu', 'cuda'))
    g.add_argument('--local_out_dir_path', type=str, default='local_output', help='logs, TensorBoard and checkpoints')
    g.add_argument('--save_freq', type=int, default=5, help='validate and save ar-ckpt-last.pth every this many epochs')
    g.add_argument('--ckpt_every_iters', type=int, default=0,
                   help='also save ar-ckpt-last.pth every this many iterations (0: off)')
    g.add_argument('--log_freq', type=int, default=0,
                   help='console / TensorBoard detail every this many iterations (0: ~10 per epoch)')
    g.add_argument('--max_nonfinite', type=int, default=10, help='stop after this many non-finite steps in a row')
    # torch.distributed.launch passes it
    g.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return p


def _batch_and_epochs(g, bs: int, bs_help: str, ep: int):
    """--bs and --ep of both trainers (their defaults differ)."""
    g.add_argument('--bs', type=int, default=bs, help=bs_help)
    g.add_argument('--ep', type=int, default=ep, help='epochs')


def _data_flags(g):
    g.add_argument('--mid_reso', type=float, default=1.125,
                   help='resize the shorter side to round(mid_reso x side), then crop')
    g.add_argument('--hflip', default=False, help='random horizontal flip', **BOOL)
    g.add_argument('--workers', type=int, default=-1, help='DataLoader worker processes per rank (-1: min(8, CPUs '
                   'per process); 0: decode images in the training process)')
    g.add_argument('--check_data', default=False, help='decode every image of train/ and val/ (in parallel), list the '
                   'unreadable ones (all of them in <local_out_dir_path>/bad_images.txt), then exit', **BOOL)
    g.add_argument('--skip_bad_images', default=False, help='replace an unreadable image by the next readable one '
                   '(in folder order, with its label; counted in the log) instead of stopping the run', **BOOL)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = get_parser()
    args = p.parse_args(argv)
    if args.vae_ckpt is None:
        from utils.download import resolve_default
        args.vae_ckpt = resolve_default(FLEX_VAE if args.flex else VAR_VAE)     # the repository's ckpts/, from anywhere
    try:
        args.patch_nums = parse_patch_nums(args.pn)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    for name, lo in (('depth', 1), ('bs', 1), ('ac', 1), ('ep', 1), ('save_freq', 1), ('max_nonfinite', 1)):
        if getattr(args, name) < lo:
            p.error(f'--{name} must be >= {lo}, got {getattr(args, name)}')
    check_ranges(p, args, TRAIN_RANGES)
    if args.use_implicit and not 0 <= args.p_depth <= args.depth:
        p.error(f'--p_depth must be between 0 and --depth ({args.depth}), got {args.p_depth}')
    if args.num_classes < 0 or args.ckpt_every_iters < 0:
        p.error('--num_classes and --ckpt_every_iters must be >= 0')
    return args


# ============================================== train_vae.py ==========================================================
# train_vae.py: the flags whose default depends on the tokenizer (VAR's VQVAE, FlexVAR's FlexVAE with --flex): the
# published files' architectures (utils.zoo.VAR_TOKENIZER; FLEX_TOKENIZER, LlamaGen's VQ-16)
VAE_DEFAULTS = {False: {'vocab_size': 4096, 'z_channels': 32, 'ch': 160},
                True: {'vocab_size': 8912, 'z_channels': 256, 'ch': 128, 'codebook_dim': 32}}


def get_vae_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train the multi-scale residual VQVAE tokenizer of VAR / VIAR, or with --flex FlexVAR's "
                            'FlexVAE tokenizer. Rerunning the same command resumes from '
                            '<local_out_dir_path>/vae-ckpt-last.pth.',
                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    unset = argparse.SUPPRESS          # family-dependent defaults (VAE_DEFAULTS), filled in by parse_vae_args
    g = p.add_argument_group('data')
    g.add_argument('--data_path', type=str, required=True,
                   help='folder with train/<class>/<images> and val/<class>/<images>')
    g.add_argument('--pn', type=str, default='256', help="scales: '256', '512' or sides like 1_2_3_4; image side = "
                   "downsampling x the last side")
    _data_flags(g)
    g = p.add_argument_group('model')
    g.add_argument('--flex', default=False, help="FlexVAR's tokenizer (FlexVAE: LlamaGen's VQ-16 layout, l2-normalised "
                   'codebook; every scale of a schedule is the feature map area-resized and quantised on its own) '
                   'instead of the residual VQVAE; the export is what train.py --flex --vae_ckpt reads', **BOOL)
    g.add_argument('--vocab_size', type=int, default=unset, help='codebook size V (default 4096; --flex: 8912)')
    g.add_argument('--z_channels', type=int, default=unset, help='VQVAE: latent / code dimension Cvae (default 32); '
                   '--flex: encoder output channels, before the 1x1 quant_conv to --codebook_dim (default 256)')
    g.add_argument('--codebook_dim', type=int, default=unset, help='--flex: code dimension Cvae (default 32)')
    g.add_argument('--ch', type=int, default=unset, help='base width of the conv encoder/decoder (default 160; '
                   '--flex: 128)')
    g.add_argument('--ch_mult', type=str, default='1_1_2_2_4', help='width multiplier per resolution level; '
                   'downsampling = 2^(levels - 1): 16 for the published tokenizer')
    g.add_argument('--num_res_blocks', type=int, default=2, help='residual blocks per level (decoder: one more)')
    g.add_argument('--attn', default=True, help='spatial self-attention at the lowest resolution (the FlexVAE layout '
                   'always has it)', **BOOL)
    g.add_argument('--norm_groups', type=int, default=32, help='GroupNorm groups (32 as published; a narrow --ch '
                   'wants fewer, e.g. --ch 32 --norm_groups 8: 32 groups of 1 channel erase colour levels)')
    g.add_argument('--beta', type=float, default=0.25, help='commitment loss weight')
    g.add_argument('--share_quant_resi', type=int, default=4, help='VQVAE: phi convs shared across scales')
    g.add_argument('--quant_resi', type=float, default=0.5, help='VQVAE: phi residual ratio')
    g.add_argument('--init', type=str, default='', help='start from this tokenizer state dict (fine-tuning)')
    g = p.add_argument_group('loss')
    g.add_argument('--l2', type=float, default=1.0, help='weight of the MSE reconstruction loss')
    g.add_argument('--l1', type=float, default=0.0, help='weight of the L1 reconstruction loss')
    g.add_argument('--ms_weight', type=float, default=1.0, help='--flex: weight of the reconstruction loss (--l2 MSE '
                   '+ --l1 L1) of one smaller scale of --pn per step, drawn at random: the features area-resized to '
                   'it, quantised, decoded at its own size and compared with the image area-resized to that size; '
                   '0: the full scale only')
    g.add_argument('--lp', type=float, default=0.0, help='weight of the perceptual loss (VGG16 features; needs '
                   "torchvision's ImageNet VGG16 weights in the torch hub cache)")
    g.add_argument('--disc', type=float, default=0.0, help='weight of the adversarial (hinge PatchGAN) loss; 0: off')
    g.add_argument('--disc_start', type=float, default=0.5,
                   help='start the adversarial loss after this fraction of training')
    g.add_argument('--disc_ch', type=int, default=64, help='PatchGAN discriminator width')
    g.add_argument('--ae_warmup', type=int, default=0, help='epochs of plain autoencoding (quantiser skipped) first; '
                   'then every code is seeded from encoder outputs (helps small tokenizers trained briefly)')
    g.add_argument('--code_restart', type=int, default=0, help='every this many iterations, re-seed codebook entries '
                   'unused at every scale with encoder outputs of the batch (0: off)')
    g = p.add_argument_group('optimisation')
    _batch_and_epochs(g, 256, 'global batch size (all ranks)', 100)
    g.add_argument('--lr', type=float, default=1e-4, help='peak learning rate (not scaled with the batch)')
    g.add_argument('--wd', type=float, default=0.0, help='AdamW weight decay (not on biases, norms, the codebook)')
    g.add_argument('--wp', type=float, default=1.0, help='warm-up epochs')
    g.add_argument('--lr_end', type=float, default=0.1, help='lr ratio at the end (cosine from 1)')
    g.add_argument('--clip', type=float, default=0.0, help='grad-norm clipping (0: off)')
    g.add_argument('--fp16', type=int, default=0, choices=(0, 1, 2),
                   help='0: fp32, 1: fp16 + GradScaler (CUDA), 2: bf16')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', type=str, default='auto', choices=('auto', 'cpu', 'cuda'))
    g.add_argument('--threads', type=int, default=0, help='CPU threads per process (0: torch default)')
    g.add_argument('--local_out_dir_path', type=str, default='local_output_vae')
    g.add_argument('--save_freq', type=int, default=1,
                   help='validate, save and draw a reconstruction grid every N epochs')
    g.add_argument('--log_freq', type=int, default=0,
                   help='console / TensorBoard every N iterations (0: ~10 per epoch)')
    g.add_argument('--n_vis', type=int, default=8, help='validation images in the reconstruction grids')
    g.add_argument('--max_nonfinite', type=int, default=10, help='stop after this many non-finite steps in a row')
    return p


def parse_vae_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = get_vae_parser()
    args = p.parse_args(argv)
    if not args.flex and hasattr(args, 'codebook_dim'):
        p.error("--codebook_dim is FlexVAE's code dimension (--flex); the VQVAE's is --z_channels")
    if args.flex and not args.attn:
        p.error('--attn False: the FlexVAE layout (LlamaGen VQ-16) always has attention at the lowest resolution')
    for k, v in VAE_DEFAULTS[args.flex].items():
        if not hasattr(args, k):
            setattr(args, k, v)
    try:
        args.patch_nums = parse_patch_nums(args.pn)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.pn = '_'.join(map(str, args.patch_nums))
    for name, lo in (('vocab_size', 2), ('z_channels', 1), ('codebook_dim', 1), ('ch', 32), ('bs', 1), ('ep', 1),
                     ('save_freq', 1)):
        if not hasattr(args, name):
            continue
        if getattr(args, name) < lo:
            p.error(f'--{name} must be >= {lo}, got {getattr(args, name)}')
    check_ranges(p, args, VAE_RANGES)
    try:
        ch_mult = tuple(int(m) for m in args.ch_mult.replace(',', '_').split('_'))
        assert ch_mult and min(ch_mult) >= 1
    except (ValueError, AssertionError):
        p.error(f'--ch_mult must be positive integers like 1_1_2_2_4, got {args.ch_mult!r}')
    args.ch_mult = ch_mult
    if args.norm_groups < 1 or any(args.ch * m % args.norm_groups for m in args.ch_mult):
        p.error(f'every level width (--ch {args.ch} x --ch_mult) must be a multiple of --norm_groups '
                f'{args.norm_groups}')
    if args.num_res_blocks < 1:
        p.error(f'--num_res_blocks must be >= 1, got {args.num_res_blocks}')
    if len(args.patch_nums) < 2:
        p.error('--pn needs at least two scales (e.g. 1_2_3_4)')
    if min(args.l1, args.l2, args.lp, args.disc, args.ms_weight) < 0 or args.l1 + args.l2 + args.lp == 0:
        p.error('loss weights must be >= 0 and at least one of --l1, --l2, --lp positive')
    args.downsample = 2 ** (len(args.ch_mult) - 1)
    args.data_load_reso = args.downsample * args.patch_nums[-1]
    return args
