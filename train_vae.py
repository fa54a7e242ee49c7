"""Trains the multi-scale residual VQVAE tokenizer of VAR / VIAR (the piece the official code never released).

    # the published tokenizer's architecture (vae_ch160v4096z32.pth) on ImageNet, 8 GPUs
    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --pn 256 --ch 160 --vocab_size 4096 \
        --z_channels 32 --bs 256 --ep 100 --lr 1e-4 --lp 1.0 --disc 0.1
    # the laptop demo (64 px images, 4 scales 1-2-3-4)
    python train_vae.py --data_path demo_output/data --pn 1_2_3_4 --ch 32 --vocab_size 256 --z_channels 16 ...

Training forward (``VQVAE.forward``): encoder -> quant_conv -> residual quantiser over the scales (nearest code,
straight-through estimator, loss = beta * commitment + codebook, beta = 0.25, averaged over scales) ->
post_quant_conv -> decoder.  Loss = l2 * MSE + l1 * L1 (reconstruction) + vq loss [+ lp * perceptual (VGG16
features, off by default) + disc * hinge-GAN generator loss (PatchGAN, off by default)].

Outputs in ``--local_out_dir_path``: stdout.txt, log.txt (JSON lines), TensorBoard ``tb-VAE...`` (losses, PSNR,
codebook usage per scale, reconstruction grids), ``recon/ep{N}.png`` (rows: inputs, then the reconstruction after
scale 1, 2, ..., K), ``vae-ckpt-last.pth`` (training checkpoint, resumed by rerunning the same command) and
``vae_ch{ch}v{V}z{Cvae}.pth``: the tokenizer that train.py (--vae_ckpt), sampling.py and
``models.checkpoint.load_vae`` read: the bare state dict of the official format, or, with ``--norm_groups`` other
than 32 (which a state dict cannot tell), ``{'trainer': {'vae_wo_ddp': state dict}, 'vae_config': {...}}``.  SIGTERM / Ctrl-C save a checkpoint first.
"""
import argparse
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models import VQVAE
from models.checkpoint import CheckpointError, read_checkpoint
from utils import dist
from utils.arg_util import args_to_dict, parse_patch_nums, str2bool
from utils.data import DataError, ResumableBatchSampler, ShardSampler, build_dataset
from utils.lr_control import lr_ratio
from utils.misc import atomic_write_bytes, save_atomic
from utils.run_log import EXIT_PREEMPTED, Preempted, StopFlag, TBWriter, UserError

ARCH_FLAGS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'attn', 'norm_groups', 'pn',
              'share_quant_resi', 'quant_resi', 'disc_ch')



# ============================================== arguments =============================================================
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    B = dict(type=str2bool, nargs='?', const=True, metavar='BOOL')
    g = p.add_argument_group('data')
    g.add_argument('--data_path', type=str, required=True, help='folder with train/<class>/<images> and val/<class>/<images>')
    g.add_argument('--pn', type=str, default='256', help="scales: '256', '512' or sides like 1_2_3_4; image side = downsampling x last")
    g.add_argument('--mid_reso', type=float, default=1.125, help='resize shorter side to round(mid_reso x side), then crop')
    g.add_argument('--hflip', default=False, help='random horizontal flip', **B)
    g.add_argument('--workers', type=int, default=0, help='DataLoader workers per rank')
    g = p.add_argument_group('model')
    g.add_argument('--vocab_size', type=int, default=4096, help='codebook size V')
    g.add_argument('--z_channels', type=int, default=32, help='latent / code dimension Cvae')
    g.add_argument('--ch', type=int, default=160, help='base width of the conv encoder/decoder')
    g.add_argument('--ch_mult', type=str, default='1_1_2_2_4', help='width multiplier per resolution level; '
                   'downsampling = 2^(levels - 1): 16 for the published tokenizer')
    g.add_argument('--num_res_blocks', type=int, default=2, help='residual blocks per level (decoder: one more)')
    g.add_argument('--attn', default=True, help='spatial self-attention at the lowest resolution', **B)
    g.add_argument('--norm_groups', type=int, default=32, help='GroupNorm groups (32 as published; a narrow --ch '
                   'wants fewer, e.g. --ch 32 --norm_groups 8: 32 groups of 1 channel erase colour levels)')
    g.add_argument('--beta', type=float, default=0.25, help='commitment loss weight')
    g.add_argument('--share_quant_resi', type=int, default=4, help='phi convs shared across scales')
    g.add_argument('--quant_resi', type=float, default=0.5, help='phi residual ratio')
    g.add_argument('--init', type=str, default='', help='start from this tokenizer state dict (fine-tuning)')
    g = p.add_argument_group('loss')
    g.add_argument('--l2', type=float, default=1.0, help='weight of the MSE reconstruction loss')
    g.add_argument('--l1', type=float, default=0.0, help='weight of the L1 reconstruction loss')
    g.add_argument('--lp', type=float, default=0.0, help='weight of the perceptual loss (VGG16 features; needs '
                   "torchvision's ImageNet VGG16 weights in the torch hub cache)")
    g.add_argument('--disc', type=float, default=0.0, help='weight of the adversarial (hinge PatchGAN) loss; 0: off')
    g.add_argument('--disc_start', type=float, default=0.5, help='start the adversarial loss after this fraction of training')
    g.add_argument('--disc_ch', type=int, default=64, help='PatchGAN discriminator width')
    g.add_argument('--ae_warmup', type=int, default=0, help='epochs of plain autoencoding (quantiser skipped) first; '
                   'then every code is seeded from encoder outputs (helps small tokenizers trained briefly)')
    g.add_argument('--code_restart', type=int, default=0, help='every this many iterations, re-seed codebook entries '
                   'unused at every scale with encoder outputs of the batch (0: off)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--bs', type=int, default=256, help='global batch size (all ranks)')
    g.add_argument('--ep', type=int, default=100, help='epochs')
    g.add_argument('--lr', type=float, default=1e-4, help='peak learning rate (not scaled with the batch)')
    g.add_argument('--wd', type=float, default=0.0, help='AdamW weight decay (not on biases, norms, the codebook)')
    g.add_argument('--wp', type=float, default=1.0, help='warm-up epochs')
    g.add_argument('--lr_end', type=float, default=0.1, help='lr ratio at the end (cosine from 1)')
    g.add_argument('--clip', type=float, default=0.0, help='grad-norm clipping (0: off)')
    g.add_argument('--fp16', type=int, default=0, choices=(0, 1, 2), help='0: fp32, 1: fp16 + GradScaler (CUDA), 2: bf16')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', type=str, default='auto', choices=('auto', 'cpu', 'cuda'))
    g.add_argument('--threads', type=int, default=0, help='CPU threads per process (0: torch default)')
    g.add_argument('--local_out_dir_path', type=str, default='local_output_vae')
    g.add_argument('--save_freq', type=int, default=1, help='validate, save and draw a reconstruction grid every N epochs')
    g.add_argument('--log_freq', type=int, default=0, help='console / TensorBoard every N iterations (0: ~10 per epoch)')
    g.add_argument('--n_vis', type=int, default=8, help='validation images in the reconstruction grids')
    g.add_argument('--max_nonfinite', type=int, default=10, help='stop after this many non-finite steps in a row')
    g.add_argument('--debug_kill_at_iter', type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = get_parser()
    args = p.parse_args(argv)
    try:
        args.patch_nums = parse_patch_nums(args.pn)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.pn = '_'.join(map(str, args.patch_nums))
    for name, lo in (('vocab_size', 2), ('z_channels', 1), ('ch', 32), ('bs', 1), ('ep', 1), ('save_freq', 1)):
        if getattr(args, name) < lo:
            p.error(f'--{name} must be >= {lo}, got {getattr(args, name)}')
    try:
        args.ch_mult = tuple(int(m) for m in args.ch_mult.replace(',', '_').split('_'))
        assert args.ch_mult and min(args.ch_mult) >= 1
    except (ValueError, AssertionError):
        p.error(f'--ch_mult must be positive integers like 1_1_2_2_4, got {args.ch_mult!r}')
    if args.norm_groups < 1 or any(args.ch * m % args.norm_groups for m in args.ch_mult):
        p.error(f'every level width (--ch {args.ch} x --ch_mult) must be a multiple of --norm_groups {args.norm_groups}')
    if args.num_res_blocks < 1:
        p.error(f'--num_res_blocks must be >= 1, got {args.num_res_blocks}')
    if len(args.patch_nums) < 2:
        p.error('--pn needs at least two scales (e.g. 1_2_3_4)')
    if min(args.l1, args.l2, args.lp, args.disc) < 0 or args.l1 + args.l2 + args.lp == 0:
        p.error('loss weights must be >= 0 and at least one of --l1, --l2, --lp positive')
    return args


# ============================================== losses ================================================================
class VGGPerceptual(nn.Module):
    """LPIPS-style distance on torchvision's ImageNet VGG16: unit-normalised features of relu1_2 ... relu5_3,
    squared differences averaged over space and channels, summed over the five layers (uniform layer weights:
    LPIPS's learned linear heads are another download)."""
    CUTS = (4, 9, 16, 23, 30)

    def __init__(self):
        super().__init__()
        import torchvision
        try:
            vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        except Exception as e:
            from torch.hub import get_dir
            raise UserError(f"--lp needs torchvision's VGG16 ImageNet weights (vgg16-397923af.pth, 528 MB), which "
                            f"could not be loaded ({type(e).__name__}); run once with internet access, or copy the file "
                            f"into {os.path.join(get_dir(), 'checkpoints')}, or pass --lp 0") from None
        self.features = vgg.features[:self.CUTS[-1]].eval().requires_grad_(False)
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)         # always frozen, eval mode

    def forward(self, x, y):
        h = torch.cat([x, y]).add(1).mul(0.5).sub(self.mean).div(self.std)
        loss, start = 0, 0
        for cut in self.CUTS:
            h = self.features[start:cut](h)
            start = cut
            a, b = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            loss = loss + (a - b).square().mean()
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (3 stride-2 4x4 convs, GroupNorm, LeakyReLU): one real/fake logit per patch."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)], ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# ============================================== helpers ===============================================================
def to_png(img_B3HW: torch.Tensor, nrow: int, pad: int = 2):
    """Images in [-1, 1] -> (PNG bytes of a grid with ``nrow`` images per row, height, width)."""
    from PIL import Image
    B, _, H, W = img_B3HW.shape
    rows = math.ceil(B / nrow)
    grid = torch.ones(3, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img_B3HW[i].add(1).mul(0.5)
    arr = grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue(), arr.shape[0], arr.shape[1]


def no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith('.bias') or 'quantize.embedding' in name


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, f_BChw: torch.Tensor, gen: torch.Generator) -> int:
    """Codebook entries unused at every scale (EMA hits below 1 % of the uniform share) get random encoder vectors
    of this batch (the same on every rank: rank 0's batch is broadcast).  Returns how many were re-seeded."""
    q = vae.quantize
    hits_V = q.ema_vocab_hit_SV.sum(0)
    dead = hits_V <= 0.01 * hits_V.sum() / q.vocab_size      # all of them when nothing was hit yet
    dead = dead.nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z_NC = f_BChw.detach().float().permute(0, 2, 3, 1).reshape(-1, q.Cvae)
    pick = torch.randint(0, z_NC.shape[0], (dead.numel(),), generator=gen).to(z_NC.device)
    new = z_NC[pick] + 0.01 * z_NC.std() * torch.randn(dead.numel(), q.Cvae, generator=gen).to(z_NC.device)
    if dist.initialized():
        torch.distributed.broadcast(new, 0)
    q.embedding.weight[dead] = new
    return int(dead.numel())


def get_rng(dev) -> dict:
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(dev) if dev.type == 'cuda' else torch.zeros(0, dtype=torch.uint8)}


def set_rng(state: dict, dev):
    torch.set_rng_state(state['torch'])
    if dev.type == 'cuda' and state['cuda'].numel():
        torch.cuda.set_rng_state(state['cuda'], dev)


# ============================================== validation ============================================================
@torch.no_grad()
def validate(vae: VQVAE, ld_val, dev, vis_B3HW):
    """Reconstruction metrics on the validation set (eval mode: the usage EMA is not touched), the share of the
    codebook hit per scale, and a grid: inputs, then the reconstruction after each scale."""
    training = vae.training
    vae.eval()
    K, V = len(vae.quantize.v_patch_nums), vae.vocab_size
    sums = torch.zeros(4, dtype=torch.float64, device=dev)       # L1, MSE, PSNR, n
    hits_SV = torch.zeros(K, V, device=dev)
    for img, _ in ld_val:
        img = img.to(dev, non_blocking=True)
        idx_Bl = vae.img_to_idxBl(img)
        for si, idx in enumerate(idx_Bl):
            hits_SV[si] += idx.flatten().bincount(minlength=V).float()
        rec = vae.img_to_reconstructed_img(img, last_one=True)
        mse_B = (rec - img).square().mean(dim=(1, 2, 3))
        sums[0] += (rec - img).abs().mean(dim=(1, 2, 3)).sum()
        sums[1] += mse_B.sum()
        sums[2] += (10 * torch.log10(4.0 / mse_B.clamp_min(1e-10))).sum()      # peak-to-peak 2 in [-1, 1]
        sums[3] += img.shape[0]
    dist.allreduce_mean(sums)
    dist.allreduce_mean(hits_SV)
    n = max(sums[3].item(), 1e-12)
    l1, mse, psnr = (sums[:3] / n).tolist()
    used = [(h > 0).float().mean().item() * 100 for h in hits_SV]
    grid = None
    if vis_B3HW is not None:
        ms = vae.img_to_reconstructed_img(vis_B3HW.to(dev))
        grid = to_png(torch.cat([vis_B3HW.to(dev)] + ms).cpu(), nrow=vis_B3HW.shape[0])
    vae.train(training)
    return {'val_L1': l1, 'val_MSE': mse, 'val_PSNR': psnr, 'val_code_used_pct': used}, grid


# ============================================== training ==============================================================
@dataclass
class Run:
    """One tokenizer training run: models, optimisers, data, and the progress a checkpoint restores."""
    args: Any
    dev: torch.device
    amp_dtype: Optional[torch.dtype]
    stop: 'StopFlag'
    log: Any                            # log(msg): console (rank 0) and stdout.txt
    vae: Any = None
    model: Any = None                   # vae, or its DDP wrapper
    disc: Any = None
    perc: Any = None
    opt: Any = None
    opt_d: Any = None
    scaler: Any = None
    gen: Optional[torch.Generator] = None   # code restarts
    iters: int = 0
    start_ep: int = 0
    start_it: int = 0
    best: float = float('inf')
    bad_in_a_row: int = 0
    tb: Optional['TBWriter'] = None

    @property
    def out(self):
        return self.args.local_out_dir_path

    @property
    def last_path(self):
        return os.path.join(self.out, 'vae-ckpt-last.pth')

    @property
    def export_path(self):
        a = self.args
        return os.path.join(self.out, f'vae_ch{a.ch}v{a.vocab_size}z{a.z_channels}.pth')

    def amp(self):
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def main(args):
    """Trains the tokenizer for ``--ep`` epochs, resuming from ``vae-ckpt-last.pth`` when the output folder has one."""
    run = setup(args)
    ckpt = find_checkpoint(run)
    sampler, ld_train, ld_val, vis = build_data(run)
    build_models(run, ckpt)
    restore_progress(run, ckpt)
    del ckpt
    if run.start_ep >= args.ep:
        run.log(f'[train_vae] nothing to do: {run.last_path} already holds {run.start_ep} epochs (--ep {args.ep}); the '
                f'tokenizer is {run.export_path}')
        return
    if dist.is_master():
        run.tb = TBWriter(os.path.join(run.out, f'tb-VAE_ch{args.ch}v{args.vocab_size}z{args.z_channels}__pn{args.pn}'),
                          purge_step=run.start_ep * run.iters + run.start_it)
    t_run = time.time()
    for ep in range(run.start_ep, args.ep):
        first = run.start_it if ep == run.start_ep else 0
        sampler.set_epoch(ep, first)
        ep_sums, usages, stop_now = train_one_epoch(run, ep, first, ld_train)
        end_of_epoch(run, ep, ep_sums, usages, stop_now, ld_val, vis, t_run)
    run.log(f'[train_vae] done in {timedelta(seconds=int(time.time() - t_run))}; tokenizer '
            f'{"(official format) " if args.norm_groups == 32 else ""}{run.export_path}; reconstructions in '
            f'{os.path.join(run.out, "recon")}')
    if run.tb:
        run.tb.close()


def setup(args) -> Run:
    """Processes, output folder, console log (rank 0 only), signal handlers, precision."""
    dev = dist.init_distributed(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    world = dist.get_world_size()
    out = args.local_out_dir_path
    try:
        os.makedirs(os.path.join(out, 'recon'), exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --local_out_dir_path {out!r}: {e.strerror}') from None
    if not dist.is_master():
        sys.stdout = open(os.devnull, 'w')
    stdout_txt = open(os.path.join(out, 'stdout.txt'), 'a', encoding='utf-8') if dist.is_master() else None

    def log(msg: str):
        print(msg, flush=True)
        if stdout_txt:
            stdout_txt.write(msg + '\n')
            stdout_txt.flush()

    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.bs < world:
        raise UserError(f'--bs {args.bs} is smaller than the {world} processes: each needs at least one image')
    args.batch_size = args.bs // world
    amp_dtype = {0: None, 1: torch.float16, 2: torch.bfloat16}[args.fp16]
    if amp_dtype is torch.float16 and dev.type != 'cuda':
        amp_dtype = torch.bfloat16
        log('[train_vae] --fp16=1 needs CUDA; bfloat16 autocast is used on CPU')
    log(f'[train_vae] {" ".join(sys.argv)}')
    return Run(args=args, dev=dev, amp_dtype=amp_dtype, stop=stop, log=log)


def find_checkpoint(run: Run) -> Optional[dict]:
    """``vae-ckpt-last.pth`` of the output folder (None for a new run), checked against this command's flags."""
    args, last_path = run.args, run.last_path
    if not os.path.isfile(last_path):
        return None
    try:
        ckpt = read_checkpoint(last_path, 'tokenizer training checkpoint')
    except CheckpointError as e:
        raise CheckpointError(f'cannot resume: {e}; move it away to start over') from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('trainer'), dict) and 'vae_wo_ddp' in ckpt['trainer']
            and isinstance(ckpt.get('args'), dict)):
        raise CheckpointError(f'{last_path!r} is not a checkpoint written by train_vae.py; move it away (or pass '
                              f'another --local_out_dir_path) to start a new run')
    given = args_to_dict(args)          # as saved (tuples as lists), so the values compare equal
    for k in ARCH_FLAGS:
        if k in ckpt['args'] and ckpt['args'][k] != given[k]:
            raise CheckpointError(f'{last_path!r} was written with --{k} {ckpt["args"][k]}, this command gives '
                                  f'--{k} {given[k]}: rerun with the same flags to resume, or pass another '
                                  f'--local_out_dir_path')
    return ckpt


def build_data(run: Run):
    """Resumable train loader, sharded val loader and the validation images of the reconstruction grids."""
    args, rank, world = run.args, dist.get_rank(), dist.get_world_size()
    reso = 2 ** (len(args.ch_mult) - 1) * args.patch_nums[-1]
    classes, train_set, val_set = build_dataset(args.data_path, reso, hflip=args.hflip, mid_reso=args.mid_reso)
    if len(val_set) == 0:
        raise DataError(f'{os.path.join(args.data_path, "val")!r} holds no images')
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, rank, world, seed=args.seed)
    run.iters = sampler.iters_per_epoch
    ld_train = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                          pin_memory=run.dev.type == 'cuda', persistent_workers=args.workers > 0)
    ld_val = DataLoader(val_set, batch_size=max(1, args.batch_size), num_workers=args.workers,
                        sampler=ShardSampler(len(val_set), rank, world))
    n_vis = min(args.n_vis, len(val_set))
    step = max(1, len(val_set) // max(n_vis, 1))        # spread over the classes
    vis = torch.stack([val_set[i * step][0] for i in range(n_vis)]) if dist.is_master() and n_vis else None
    run.log(f'[data] {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, {reso} px, '
            f'scales {args.pn}; per-rank batch {args.batch_size}, {run.iters} iterations per epoch')
    return sampler, ld_train, ld_val, vis


def build_models(run: Run, ckpt: Optional[dict]):
    """The VQVAE (from scratch, ``--init`` or the checkpoint), optional discriminator and perceptual loss, AdamW
    optimisers, GradScaler, DDP."""
    args, dev, world = run.args, run.dev, dist.get_world_size()
    torch.manual_seed(args.seed)
    vae = VQVAE(vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, beta=args.beta,
                share_quant_resi=args.share_quant_resi, quant_resi=args.quant_resi,
                v_patch_nums=tuple(args.patch_nums), test_mode=False, ch_mult=args.ch_mult,
                num_res_blocks=args.num_res_blocks, using_sa=args.attn, using_mid_sa=args.attn,
                norm_groups=args.norm_groups).to(dev)
    vae.init_weights()
    if args.init and not ckpt:
        from models.checkpoint import load_vae
        src = load_vae(args.init, 'cpu', patch_nums=tuple(args.patch_nums))
        try:
            vae.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'--init {args.init!r} does not fit --ch/--vocab_size/--z_channels '
                                  f'({str(e).splitlines()[0]})') from None
    vae.train()
    disc = PatchDiscriminator(args.disc_ch).to(dev).train() if args.disc > 0 else None
    perc = None
    if args.lp > 0:
        if dist.is_master():
            perc = VGGPerceptual()      # rank 0 downloads into the cache first (or fails for everyone below)
        dist.barrier()
        perc = (perc or VGGPerceptual()).to(dev)
    groups = [{'params': [p for n, p in vae.named_parameters() if not no_decay(n, p)], 'weight_decay': args.wd},
              {'params': [p for n, p in vae.named_parameters() if no_decay(n, p)], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0) if disc else None
    scaler = torch.amp.GradScaler('cuda') if run.amp_dtype is torch.float16 else None
    if ckpt:
        tr = ckpt['trainer']
        try:
            vae.load_state_dict(tr['vae_wo_ddp'], strict=True)
            opt.load_state_dict(tr['vae_opt'])
            if disc is not None and 'disc' in tr:
                disc.load_state_dict(tr['disc'])
                opt_d.load_state_dict(tr['disc_opt'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{run.last_path!r} does not fit this command ({str(e).splitlines()[0]}); pass '
                                  f'another --local_out_dir_path to start a new run') from None
    n_params = sum(p.numel() for p in vae.parameters())
    run.log(f'[model] VQVAE ch={args.ch} V={args.vocab_size} Cvae={args.z_channels}: {n_params / 1e6:.2f}M '
            f'parameters; losses: l2 {args.l2} l1 {args.l1} vq (beta {args.beta}) lp {args.lp} disc {args.disc}')
    model = vae
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        K = len(args.patch_nums)
        phis = list(vae.quantize.quant_resi.modules())      # with few scales some phi convs may get no gradient
        used = {id(vae.quantize.phi(si, K)) for si in range(K)}
        unused = args.ae_warmup > 0 or any(isinstance(m, nn.Conv2d) and id(m) not in used for m in phis)
        model = DDP(vae, device_ids=[dev.index] if dev.type == 'cuda' else None, find_unused_parameters=unused,
                    broadcast_buffers=False)
        if disc is not None:
            disc = DDP(disc, device_ids=[dev.index] if dev.type == 'cuda' else None, broadcast_buffers=False)
    run.vae, run.model, run.disc, run.perc, run.opt, run.opt_d, run.scaler = vae, model, disc, perc, opt, opt_d, scaler


def restore_progress(run: Run, ckpt: Optional[dict]):
    """Schedule position, best validation MSE, RNG states and the code-restart generator."""
    run.gen = torch.Generator().manual_seed(run.args.seed + 12345)
    if not ckpt:
        return
    run.start_ep, run.start_it = int(ckpt['epoch']), int(ckpt['iter'])
    res = ckpt.get('resume', {})
    run.vae.quantize.record_hit = int(res.get('record_hit', 1))
    run.best = float(res.get('best', run.best))
    rngs = res.get('rng', [])
    if len(rngs) == dist.get_world_size():
        set_rng(rngs[dist.get_rank()], run.dev)
    if 'gen' in res:
        run.gen.set_state(res['gen'])
    if run.start_it >= run.iters:
        run.start_ep, run.start_it = run.start_ep + 1, 0
    run.log(f'[resume] from {run.last_path}: epoch {run.start_ep + 1}/{run.args.ep}, iteration '
            f'{run.start_it + 1}/{run.iters}')


def save_checkpoint(run: Run, ep: int, it: int, metrics: Optional[dict] = None) -> bool:
    """Collective.  Rank 0 writes ``vae-ckpt-last.pth`` and the tokenizer export (``vae-best.pth`` too when the
    validation MSE improved), atomically.  The export is the official bare state dict when the keys tell the whole
    architecture (norm_groups 32), else ``{'trainer': {'vae_wo_ddp': ...}, 'vae_config': {'norm_groups': G}}``
    (``models.checkpoint.load_vae`` reads both).  Returns whether the MSE improved."""
    args, vae = run.args, run.vae
    improved = metrics is not None and metrics['val_MSE'] < run.best
    rngs = [None] * dist.get_world_size()
    if dist.initialized():
        torch.distributed.all_gather_object(rngs, get_rng(run.dev))
    else:
        rngs = [get_rng(run.dev)]
    if dist.is_master():
        vae_config = {'norm_groups': args.norm_groups}
        tr = {'vae_wo_ddp': vae.state_dict(), 'vae_opt': run.opt.state_dict()}
        if run.disc is not None:
            tr['disc'] = getattr(run.disc, 'module', run.disc).state_dict()
            tr['disc_opt'] = run.opt_d.state_dict()
        state = {'epoch': ep, 'iter': it, 'trainer': tr, 'args': args_to_dict(args), 'vae_config': vae_config,
                 'resume': {'rng': rngs, 'gen': run.gen.get_state(), 'record_hit': vae.quantize.record_hit,
                            'best': min(run.best, metrics['val_MSE']) if metrics else run.best}}
        sd = vae.state_dict()
        export = sd if args.norm_groups == 32 else {'trainer': {'vae_wo_ddp': sd}, 'vae_config': vae_config}
        try:
            save_atomic(state, run.last_path)
            save_atomic(export, run.export_path)
            if improved:
                save_atomic(export, os.path.join(run.out, 'vae-best.pth'))
        except OSError as e:
            raise UserError(f'could not write {run.last_path!r} ({e.strerror or e}): free disk space and rerun the '
                            f'same command (it resumes from the previous checkpoint)') from None
    dist.barrier()
    if improved:
        run.best = metrics['val_MSE']
    return improved


def train_step(run: Run, img: torch.Tensor, g_it: int, warm: bool):
    """Forward, losses, backward and optimiser step(s) of one iteration -> (stats [loss, rec MSE, vq] averaged over
    ranks, per-scale usage %, grad norm, non-finite?, generator loss, discriminator loss)."""
    args, vae, opt, scaler, disc = run.args, run.vae, run.opt, run.scaler, run.disc
    use_disc = disc is not None and g_it >= int(args.disc_start * args.ep * run.iters)
    with run.amp():
        rec, usages, vq_loss = run.model(img, ret_usages=True, quantize=not warm)
        usages = usages or [0.0] * len(args.patch_nums)
        rec = rec.float()
        mse = F.mse_loss(rec, img)
        loss = args.l2 * mse + vq_loss
        if args.l1:
            loss = loss + args.l1 * (rec - img).abs().mean()
        if run.perc is not None:
            loss = loss + args.lp * run.perc(rec, img)
        g_loss = None
        if use_disc:
            disc.requires_grad_(False)
            g_loss = -disc(rec).float().mean()
            loss = loss + args.disc * g_loss
    stats = torch.tensor([loss.item(), mse.item(), vq_loss.item()])
    dist.allreduce_mean(stats)
    bad = not math.isfinite(stats[0].item())
    gn = float('nan')
    if not bad:
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), args.clip if args.clip > 0 else float('inf')).item()
        if scaler:
            scaler.step(opt)
            scaler.update()
        elif math.isfinite(gn):
            opt.step()
        else:
            bad = True
    d_loss = None
    if use_disc and not bad:          # discriminator step (hinge)
        disc.requires_grad_(True)
        with run.amp():
            d_loss = (F.relu(1 - disc(img)).mean() + F.relu(1 + disc(rec.detach())).mean()).float()
        run.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        run.opt_d.step()
    return stats, usages, gn, bad, g_loss, d_loss


def train_one_epoch(run: Run, ep: int, first: int, ld_train):
    """Iterations ``first..`` of epoch ``ep`` with lr schedule, codebook restarts, logging and preemption ->
    (epoch sums [loss, rec MSE, vq, n, grad norm], last per-scale usage %, stop requested)."""
    args, vae, iters, log, tb = run.args, run.vae, run.iters, run.log, run.tb
    max_it, wp_it = args.ep * iters, args.wp * iters
    log_freq = args.log_freq or max(1, iters // 10)
    ep_sums = torch.zeros(5, dtype=torch.float64)
    stop_now, usages = False, []
    t_last, dt = time.time(), None
    for it, (img, _) in enumerate(ld_train, start=first):
        g_it = ep * iters + it
        if g_it == args.debug_kill_at_iter:
            os.kill(os.getpid(), signal.SIGTERM)
        ratio = lr_ratio('cos', g_it, wp_it, max_it, wp0=0.01, wpe=args.lr_end)
        for o in (run.opt, run.opt_d):
            if o is not None:
                for gr in o.param_groups:
                    gr['lr'] = args.lr * ratio
        img = img.to(run.dev, non_blocking=True)
        warm = ep < args.ae_warmup
        if args.ae_warmup and g_it == args.ae_warmup * iters:   # the warm-up ends: codes from encoder outputs
            with torch.no_grad():
                vae.quantize.ema_vocab_hit_SV.zero_()
                log(f'[codebook] seeded {restart_dead_codes(vae, vae.img_to_f(img), run.gen)} codes from encoder outputs')
        stats, usages, gn, bad, g_loss, d_loss = train_step(run, img, g_it, warm)
        if args.code_restart and not warm and (g_it + 1) % args.code_restart == 0 and g_it + 1 < max_it:
            with torch.no_grad():
                n_re = restart_dead_codes(vae, vae.img_to_f(img), run.gen)
            if n_re and g_it + 1 < max_it * 0.8:
                log(f'[codebook] re-seeded {n_re} unused codes')
        if bad:
            run.bad_in_a_row += 1
            log(f'[ep {ep + 1} it {it + 1}] non-finite loss or gradient: step skipped ({run.bad_in_a_row} in a row)')
            if run.bad_in_a_row >= args.max_nonfinite:
                raise UserError(f'{run.bad_in_a_row} steps in a row were non-finite: lower --lr or set --clip 1, then '
                                f'rerun (it resumes from {run.last_path} if one was saved)')
        else:
            run.bad_in_a_row = 0
            ep_sums += torch.tensor([stats[0], stats[1], stats[2], 1, gn], dtype=torch.float64)
        now = time.time()
        dt = now - t_last if dt is None else 0.9 * dt + 0.1 * (now - t_last)
        t_last = now
        if it == first or (it + 1) % log_freq == 0 or it + 1 == iters:
            usage_txt = ' '.join(f'{u:.0f}' for u in usages)
            eta = timedelta(seconds=int(dt * (max_it - g_it - 1)))
            log(f'[ep {ep + 1:3d}/{args.ep}] [{it + 1:4d}/{iters}] eta {eta}  loss {stats[0]:.4f}  rec_mse '
                f'{stats[1]:.4f}  vq {stats[2]:.4f}  lr {args.lr * ratio:.2e}  gnorm {gn:.2f}  usage% [{usage_txt}]'
                + (f'  G {g_loss.item():.3f} D {d_loss.item():.3f}' if d_loss is not None else ''))
            if tb:
                for k, v in (('loss', stats[0]), ('rec_mse', stats[1]), ('vq_loss', stats[2])):
                    tb.add_scalar(f'VAE_iter/{k}', v, g_it)
                tb.add_scalar('VAE_opt/lr', args.lr * ratio, g_it)
                tb.add_scalar('VAE_opt/grad_norm', gn, g_it)
                for si, u in enumerate(usages):
                    tb.add_scalar(f'VAE_usage/scale{si}_pn{args.patch_nums[si]}', u, g_it)
                if d_loss is not None:
                    tb.add_scalar('VAE_gan/G', g_loss.item(), g_it)
                    tb.add_scalar('VAE_gan/D', d_loss.item(), g_it)
        stop_all = dist.allreduce_mean(torch.tensor([1.0 if run.stop.signame else 0.0], device=run.dev))
        stop_now = stop_all.item() > 0          # every rank agrees
        if stop_now and it + 1 < iters:
            save_checkpoint(run, ep, it + 1)
            raise Preempted(f'{run.stop.signame or "a signal on another rank"}: checkpoint saved in epoch {ep + 1} '
                            f'after iteration {it + 1}/{iters} ({run.last_path}); rerun the same command to resume')
    return ep_sums, usages, stop_now


def end_of_epoch(run: Run, ep: int, ep_sums, usages, stop_now: bool, ld_val, vis, t_run: float):
    """log.txt / TensorBoard / console; every ``--save_freq`` epochs (and at the end, and on preemption) validation,
    a reconstruction grid and a checkpoint."""
    args, tb = run.args, run.tb
    n = max(ep_sums[3].item(), 1)
    rec_ep = {'kind': 'epoch', 'ep': ep + 1, 'loss': ep_sums[0].item() / n, 'rec_mse': ep_sums[1].item() / n,
              'vq': ep_sums[2].item() / n, 'grad_norm': ep_sums[4].item() / n,
              'usage_pct': [round(u, 2) for u in usages], 'elapsed_s': round(time.time() - t_run, 1)}
    metrics = None
    if (ep + 1) % args.save_freq == 0 or ep + 1 == args.ep or stop_now:
        metrics, grid = validate(run.vae, ld_val, run.dev, vis)
        rec_ep.update(metrics)
        if dist.is_master() and grid is not None:
            png, h, w = grid
            atomic_write_bytes(png, os.path.join(run.out, 'recon', f'ep{ep + 1:04d}.png'))
            if tb:
                tb.add_png('VAE_recon/inputs_then_scales', png, h, w, ep + 1)
        if tb:
            for k in ('val_L1', 'val_MSE', 'val_PSNR'):
                tb.add_scalar(f'VAE_val/{k}', metrics[k], ep + 1)
            for si, u in enumerate(metrics['val_code_used_pct']):
                tb.add_scalar(f'VAE_val/code_used_pct_scale{si}', u, ep + 1)
    if tb:
        for k in ('loss', 'rec_mse', 'vq'):
            tb.add_scalar(f'VAE_ep/{k}', rec_ep[k], ep + 1)
        tb.flush()
    if dist.is_master():
        with open(os.path.join(run.out, 'log.txt'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(rec_ep) + '\n')
    val_txt = (f"  val: L1 {metrics['val_L1']:.4f} MSE {metrics['val_MSE']:.4f} PSNR {metrics['val_PSNR']:.2f} dB  "
               f"codes used% [{' '.join(f'{u:.0f}' for u in metrics['val_code_used_pct'])}]") if metrics else ''
    run.log(f'     [ep {ep + 1}] train rec_mse {rec_ep["rec_mse"]:.4f} vq {rec_ep["vq"]:.4f}{val_txt}')
    if metrics is not None:
        save_checkpoint(run, ep + 1, 0, metrics)
    if stop_now:
        raise Preempted(f'{run.stop.signame or "a signal on another rank"}: checkpoint saved at the end of epoch '
                        f'{ep + 1} ({run.last_path}); rerun the same command to resume')


def run(argv=None) -> int:
    args = parse_args(argv)
    try:
        main(args)
        return 0
    except Preempted as e:
        print(f'[train_vae] stopped by {e}', flush=True)
        return EXIT_PREEMPTED
    except (UserError, CheckpointError, DataError) as e:
        if dist.get_rank() == 0:
            print(f'[train_vae.py] error: {e}', file=sys.stderr, flush=True)
        return 1
    except torch.OutOfMemoryError:
        print(f'[train_vae.py] error: out of device memory at a per-rank batch of {args.bs // dist.get_world_size()}: '
              f'lower --bs, then rerun to resume', file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print('[train_vae] interrupted (no checkpoint written since the last save)', file=sys.stderr, flush=True)
        return 130
    finally:
        dist.destroy()


if __name__ == '__main__':
    sys.exit(run())
