"""Trains the multi-scale residual VQVAE tokenizer of VAR / VIAR (the piece the official code never released).

    # the published tokenizer's architecture (vae_ch160v4096z32.pth) on ImageNet, 8 GPUs
    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --pn 256 --ch 160 --vocab_size 4096 \
        --z_channels 32 --bs 256 --ep 100 --lr 1e-4 --lp 1.0 --disc 0.1
    # the laptop demo (64 px images, 4 scales 1-2-3-4)
    python train_vae.py --data_path demo_output/data --pn 1_2_3_4 --ch 32 --vocab_size 256 --z_channels 16 ...

Training forward (``VQVAE.forward``): encoder -> quant_conv -> residual quantiser over the scales (nearest code,
straight-through estimator, loss = beta * commitment + codebook, beta = 0.25, averaged over scales) ->
post_quant_conv -> decoder.  Loss = l2 * MSE + l1 * L1 (reconstruction) + vq loss [+ lp * perceptual (VGG16
features, off by default) + disc * hinge-GAN generator loss (PatchGAN, off by default)]; the loss networks and
the codebook restarts are in ``models/vq_losses.py``, the flags in ``utils/arg_util.py``, the harness (logging,
checkpoints, steps, preemption) in ``utils/training.py``.

Outputs in ``--local_out_dir_path``: stdout.txt / stderr.txt, log.txt (JSON lines), TensorBoard ``tb-VAE...``
(losses, PSNR, codebook usage per scale, reconstruction grids), ``recon/ep{N}.png`` (rows: inputs, then the
reconstruction after scale 1, 2, ..., K), ``vae-ckpt-last.pth`` (training checkpoint, resumed exactly by
rerunning the same command) and ``vae_ch{ch}v{V}z{Cvae}.pth``: the tokenizer that train.py (--vae_ckpt),
sampling.py and ``models.checkpoint.load_vae`` read: the bare state dict of the official format, or, with
``--norm_groups`` other than 32 (which a state dict cannot tell), ``{'trainer': {'vae_wo_ddp': state dict},
'vae_config': {...}}``.  SIGTERM / Ctrl-C -- and an unreadable image -- save a checkpoint first.
"""
import io
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from models import VQVAE
from models.checkpoint import CheckpointError, load_vae
from models.vq_losses import PatchDiscriminator, VGGPerceptual, restart_dead_codes
from utils import dist, training
from utils.arg_util import args_to_dict, default_workers, parse_vae_args
from utils.data import DataError, ResumableBatchSampler, ShardSampler, build_dataset
from utils.errors import UserError
from utils.lr_control import lr_ratio
from utils.misc import atomic_write_bytes
from utils.training import Batches, Pace, Run, Sums

ARCH_FLAGS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'attn', 'norm_groups', 'pn',
              'share_quant_resi', 'quant_resi', 'disc_ch')
EPOCH_SUMS = ('loss', 'rec_mse', 'vq', 'iters', 'grad_norm', 'skipped')


@dataclass
class Trainer:
    """The tokenizer and its loss networks and optimisers, and the progress a checkpoint restores."""
    vae: VQVAE
    model: Any                          # vae, or its DDP wrapper
    disc: Any                           # PatchGAN (DDP under torchrun) or None
    perc: Any                           # VGG16 perceptual distance or None
    opt: torch.optim.Optimizer
    opt_d: Optional[torch.optim.Optimizer]
    scaler: Any
    gen: torch.Generator                # codebook restarts (the same draws on every rank)
    ep_sums: Sums
    iters: int = 0
    start_ep: int = 0
    start_it: int = 0
    best: float = float('inf')          # best validation MSE
    bad_in_a_row: int = 0


class Step(NamedTuple):
    metrics: torch.Tensor               # this rank's loss, rec MSE, vq loss (on the device)
    usages: list                        # codebook usage % per scale (logged iterations only)
    grad_norm: Optional[float]          # None: non-finite, the step was skipped
    g_loss: Optional[torch.Tensor]
    d_loss: Optional[torch.Tensor]


def main(args):
    """Trains the tokenizer for ``--ep`` epochs, resuming from ``vae-ckpt-last.pth`` when the run folder has one."""
    run = training.start(args, 'train_vae.py', subdirs=('recon',))
    world = dist.get_world_size()
    if args.bs < world:
        raise UserError(f'--bs {args.bs} is smaller than the {world} processes: each needs at least one image')
    args.batch_size = args.bs // world
    args.workers = min(default_workers() if args.workers < 0 else args.workers, args.batch_size)
    ckpt = find_checkpoint(run)

    # ---- data ----
    classes, train_set, val_set = build_dataset(args.data_path, args.data_load_reso, hflip=args.hflip,
                                                mid_reso=args.mid_reso, skip_bad=args.skip_bad_images)
    if args.check_data:
        return training.check_images(run, [train_set, val_set], args.workers)
    if len(val_set) == 0:
        raise DataError(f'{os.path.join(args.data_path, "val")!r} holds no images')
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, dist.get_rank(), world, seed=args.seed)
    ld_train = training.make_loader(train_set, run.dev, args.workers, args.seed, batch_sampler=sampler)
    ld_val = training.make_loader(val_set, run.dev, args.workers, args.seed, batch_size=args.batch_size,
                                  sampler=ShardSampler(len(val_set), dist.get_rank(), world))
    n_vis = min(args.n_vis, len(val_set))
    step = max(1, len(val_set) // max(n_vis, 1))        # spread over the classes
    vis = torch.stack([val_set[i * step][0] for i in range(n_vis)]) if dist.is_master() and n_vis else None
    run.log.info(f'[data] {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, '
                 f'{args.data_load_reso} px, scales {args.pn}; per-rank batch {args.batch_size}, '
                 f'{sampler.iters_per_epoch} iterations per epoch, {args.workers} loader worker(s) per process')

    # ---- models, optimisers, progress ----
    t = build_trainer(run, ckpt)
    t.iters = sampler.iters_per_epoch
    restore_progress(run, t, ckpt)
    del ckpt
    if t.start_ep >= args.ep:
        run.log.info(f'[train_vae] nothing to do: {run.path("vae-ckpt-last.pth")} already holds {t.start_ep} epochs '
                     f'(--ep {args.ep}); the tokenizer is {export_path(run)}')
        return
    if dist.is_master():
        run.tb = training.TBWriter(run.path(f'tb-VAE_ch{args.ch}v{args.vocab_size}z{args.z_channels}__pn{args.pn}'),
                                   purge_step=t.start_ep * t.iters + t.start_it)

    # ---- the epochs ----
    t_run = time.time()
    for ep in range(t.start_ep, args.ep):
        first = t.start_it if ep == t.start_ep else 0
        if first == 0:
            t.ep_sums.zero_()
        sampler.set_epoch(ep, first)
        usages = train_one_epoch(run, t, ep, first, ld_train)
        end_of_epoch(run, t, ep, usages, ld_val, vis, t_run, (train_set, val_set))
    run.log.info(f'[train_vae] done in {timedelta(seconds=int(time.time() - t_run))}; tokenizer '
                 f'{"(official format) " if args.norm_groups == 32 else ""}{export_path(run)}; reconstructions in '
                 f'{run.path("recon")}')
    if run.tb:
        run.tb.close()


def export_path(run: Run) -> str:
    a = run.args
    return run.path(f'vae_ch{a.ch}v{a.vocab_size}z{a.z_channels}.pth')


def find_checkpoint(run: Run) -> Optional[dict]:
    """``vae-ckpt-last.pth`` of the run folder (None for a new run), checked against this command's flags."""
    path = run.path('vae-ckpt-last.pth')
    ckpt = training.load_resume_checkpoint(path, 'train_vae.py', ('vae_wo_ddp',))
    if ckpt:
        training.check_same_flags(ckpt['args'], args_to_dict(run.args), ARCH_FLAGS, path)
    return ckpt


def build_trainer(run: Run, ckpt: Optional[dict]) -> Trainer:
    """The VQVAE (from scratch, ``--init`` or the checkpoint), optional discriminator and perceptual loss, AdamW
    optimisers (betas 0.5/0.9; no decay on biases, norms and the codebook), GradScaler, DDP."""
    args, dev = run.args, run.dev
    torch.manual_seed(args.seed)
    vae = VQVAE(vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, beta=args.beta,
                share_quant_resi=args.share_quant_resi, quant_resi=args.quant_resi,
                v_patch_nums=tuple(args.patch_nums), test_mode=False, ch_mult=args.ch_mult,
                num_res_blocks=args.num_res_blocks, using_sa=args.attn, using_mid_sa=args.attn,
                norm_groups=args.norm_groups).to(dev)
    vae.init_weights()
    if args.init and not ckpt:
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
    no_decay = lambda n, p: p.ndim <= 1 or n.endswith('.bias') or 'quantize.embedding' in n
    groups = [{'params': [p for n, p in vae.named_parameters() if not no_decay(n, p)], 'weight_decay': args.wd},
              {'params': [p for n, p in vae.named_parameters() if no_decay(n, p)], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0) if disc else None
    if ckpt:
        tr = ckpt['trainer']
        try:
            vae.load_state_dict(tr['vae_wo_ddp'], strict=True)
            opt.load_state_dict(tr['vae_opt'])
            if disc is not None and 'disc' in tr:
                disc.load_state_dict(tr['disc'])
                opt_d.load_state_dict(tr['disc_opt'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{run.path("vae-ckpt-last.pth")!r} does not fit this command '
                                  f'({str(e).splitlines()[0]}); pass another --local_out_dir_path to start a new run') from None
    run.log.info(f'[model] VQVAE ch={args.ch} V={args.vocab_size} Cvae={args.z_channels}: '
                 f'{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters; losses: l2 {args.l2} l1 {args.l1} '
                 f'vq (beta {args.beta}) lp {args.lp} disc {args.disc}')
    K = len(args.patch_nums)            # with few scales some phi convs get no gradient
    used = {id(vae.quantize.phi(si, K)) for si in range(K)}
    unused = args.ae_warmup > 0 or any(isinstance(m, torch.nn.Conv2d) and id(m) not in used
                                       for m in vae.quantize.quant_resi.modules())
    return Trainer(vae=vae, model=training.wrap_ddp(vae, dev, find_unused=unused),
                   disc=training.wrap_ddp(disc, dev) if disc is not None else None, perc=perc, opt=opt, opt_d=opt_d,
                   scaler=torch.amp.GradScaler('cuda') if run.amp_dtype is torch.float16 else None,
                   gen=torch.Generator().manual_seed(args.seed + 12345), ep_sums=Sums(EPOCH_SUMS, dev))


def restore_progress(run: Run, t: Trainer, ckpt: Optional[dict]):
    """Schedule position, best validation MSE, epoch sums, RNG states and the code-restart generator."""
    if not ckpt:
        return
    t.start_ep, t.start_it = int(ckpt['epoch']), int(ckpt['iter'])
    res = ckpt.get('resume', {})
    t.vae.quantize.record_hit = int(res.get('record_hit', 1))
    t.best, t.bad_in_a_row = float(res.get('best', t.best)), int(res.get('bad_in_a_row', 0))
    rngs, rank_sums, rank = res.get('rng', []), res.get('rank_ep_sums'), dist.get_rank()
    if len(rngs) == dist.get_world_size():
        training.set_rng_state(rngs[rank], run.dev)
        if t.start_it and rank_sums is not None:
            t.ep_sums.load(rank_sums[rank])
    if 'gen' in res:
        t.gen.set_state(res['gen'])
    if t.start_it >= t.iters:
        t.start_ep, t.start_it = t.start_ep + 1, 0
    run.log.info(f'[resume] from {run.path("vae-ckpt-last.pth")}: epoch {t.start_ep + 1}/{run.args.ep}, iteration '
                 f'{t.start_it + 1}/{t.iters}')


def save_checkpoint(run: Run, t: Trainer, ep: int, it: int, val_mse: Optional[float] = None) -> bool:
    """Collective.  Local rank 0 writes ``vae-ckpt-last.pth`` and the tokenizer export (``vae-best.pth`` too when
    the validation MSE improved), atomically.  The export is the official bare state dict when the keys tell the
    whole architecture (norm_groups 32), else ``{'trainer': {'vae_wo_ddp': ...}, 'vae_config': {'norm_groups': G}}``
    (``models.checkpoint.load_vae`` reads both).  Returns whether the MSE improved."""
    args, vae = run.args, t.vae
    improved = val_mse is not None and val_mse < t.best
    t.best = min(t.best, val_mse) if val_mse is not None else t.best
    rngs, rank_sums = training.gather_object(training.rng_state(run.dev)), training.gather_tensor(t.ep_sums.t)
    if dist.get_local_rank() == 0:
        vae_config = {'norm_groups': args.norm_groups}
        tr = {'vae_wo_ddp': vae.state_dict(), 'vae_opt': t.opt.state_dict()}
        if t.disc is not None:
            tr['disc'] = getattr(t.disc, 'module', t.disc).state_dict()
            tr['disc_opt'] = t.opt_d.state_dict()
        state = {'epoch': ep, 'iter': it, 'trainer': tr, 'args': args_to_dict(args), 'vae_config': vae_config,
                 'resume': {'rng': rngs, 'gen': t.gen.get_state(), 'record_hit': vae.quantize.record_hit,
                            'best': t.best, 'bad_in_a_row': t.bad_in_a_row, 'rank_ep_sums': rank_sums}}
        sd = vae.state_dict()
        training.write_checkpoint(state, run.path('vae-ckpt-last.pth'))
        training.write_checkpoint(sd if args.norm_groups == 32 else {'trainer': {'vae_wo_ddp': sd}, 'vae_config': vae_config},
                                  export_path(run), run.path('vae-best.pth') if improved else None)
    dist.barrier()
    return improved


# ============================================== one epoch =============================================================
def train_step(run: Run, t: Trainer, img: torch.Tensor, g_it: int, warm: bool, log_now: bool) -> Step:
    """Forward, losses, backward, optimiser step (then the discriminator's) of one iteration; no host sync besides
    the gradient norm."""
    args, disc = run.args, t.disc
    use_disc = disc is not None and g_it >= int(args.disc_start * args.ep * t.iters)
    with run.autocast():
        rec, usages, vq_loss = t.model(img, ret_usages=log_now, quantize=not warm)
        rec = rec.float()
        mse = F.mse_loss(rec, img)
        loss = args.l2 * mse + vq_loss
        if args.l1:
            loss = loss + args.l1 * (rec - img).abs().mean()
        if t.perc is not None:
            loss = loss + args.lp * t.perc(rec, img)
        g_loss = None
        if use_disc:
            disc.requires_grad_(False)
            g_loss = -disc(rec).float().mean()
            loss = loss + args.disc * g_loss
    (t.scaler.scale(loss) if t.scaler else loss).backward()
    gn = training.optimizer_step(t.opt, t.scaler, list(t.vae.parameters()), args.clip,
                                 set_to_none=t.model is t.vae)
    d_loss = None
    if use_disc and gn is not None:       # discriminator step (hinge)
        disc.requires_grad_(True)
        with run.autocast():
            d_loss = (F.relu(1 - disc(img)).mean() + F.relu(1 + disc(rec.detach())).mean()).float()
        t.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        t.opt_d.step()
    metrics = torch.stack([loss.detach().float(), mse.detach(), vq_loss.detach().float()])
    return Step(metrics, usages or [0.0] * len(args.patch_nums), gn, g_loss, d_loss)


def train_one_epoch(run: Run, t: Trainer, ep: int, first: int, ld_train) -> list:
    """Iterations ``first..`` of epoch ``ep`` with lr schedule, codebook restarts, logging, and at each step
    boundary the ranks' agreement to stop (SIGTERM / Ctrl-C, an unreadable image: save first) -> last usages."""
    args, vae, iters, tb = run.args, t.vae, t.iters, run.tb
    max_it, wp_it = args.ep * iters, args.wp * iters
    log_freq = args.log_freq or max(1, iters // 10)
    batches, pace, usages = Batches(ld_train), Pace(), []
    for it in range(first, iters):
        batch = batches.take(1)         # step boundary: every rank agrees to go on, or saves and stops
        training.step_boundary(run, batches, lambda: save_checkpoint(run, t, ep, it),
                               f'in epoch {ep + 1} after iteration {it}/{iters} ({run.path("vae-ckpt-last.pth")})')
        img = batch[0][0].to(run.dev, non_blocking=True)
        g_it = ep * iters + it
        if g_it == args.debug_kill_at_iter:
            os.kill(os.getpid(), getattr(signal, 'SIG' + args.debug_kill_signal))
        ratio = lr_ratio('cos', g_it, wp_it, max_it, wp0=0.01, wpe=args.lr_end)
        for o in (t.opt, t.opt_d):
            for gr in (o.param_groups if o is not None else ()):
                gr['lr'] = args.lr * ratio
        warm = ep < args.ae_warmup
        if args.ae_warmup and g_it == args.ae_warmup * iters:   # the warm-up ends: codes from encoder outputs
            with torch.no_grad():
                vae.quantize.ema_vocab_hit_SV.zero_()
                run.log.info(f'[codebook] seeded {restart_dead_codes(vae, vae.img_to_f(img), t.gen)} codes from encoder outputs')
        log_now = it == first or (it + 1) % log_freq == 0 or it + 1 == iters
        s = train_step(run, t, img, g_it, warm, log_now)
        if args.code_restart and not warm and (g_it + 1) % args.code_restart == 0 and g_it + 1 < max_it:
            with torch.no_grad():
                n_re = restart_dead_codes(vae, vae.img_to_f(img), t.gen)
            if n_re and g_it + 1 < max_it * 0.8:
                run.log.info(f'[codebook] re-seeded {n_re} unused codes')
        if s.grad_norm is None:
            t.bad_in_a_row += 1
            t.ep_sums.inc(skipped=1)
            run.log.info(f'[ep {ep + 1} it {it + 1}] non-finite loss or gradient: step skipped ({t.bad_in_a_row} in a row)')
            if t.bad_in_a_row >= args.max_nonfinite:
                raise UserError(f'{t.bad_in_a_row} steps in a row were non-finite: lower --lr or set --clip 1, then '
                                f'rerun (it resumes from {run.path("vae-ckpt-last.pth")} if one was saved)')
        else:
            t.bad_in_a_row = 0
            t.ep_sums.add('loss', s.metrics)
            t.ep_sums.inc(iters=1, grad_norm=s.grad_norm)
        pace.tick()
        if log_now:     # a collective: every rank logs the same iterations
            loss, rec_mse, vq = dist.allreduce_mean(s.metrics).tolist()
            usages, gn = s.usages, s.grad_norm if s.grad_norm is not None else float('nan')
            gan = {'G': s.g_loss.item(), 'D': s.d_loss.item()} if s.d_loss is not None else {}
            run.log.info(f'[ep {ep + 1:3d}/{args.ep}] [{it + 1:4d}/{iters}] eta {pace.left(max_it - g_it - 1)}  loss '
                         f'{loss:.4f}  rec_mse {rec_mse:.4f}  vq {vq:.4f}  lr {args.lr * ratio:.2e}  gnorm {gn:.2f}  '
                         f'usage% [{" ".join(f"{u:.0f}" for u in usages)}]'
                         + (f'  G {gan["G"]:.3f} D {gan["D"]:.3f}' if gan else ''))
            if tb:
                tb.scalars(g_it, {'loss': loss, 'rec_mse': rec_mse, 'vq_loss': vq}, prefix='VAE_iter/')
                tb.scalars(g_it, {'lr': args.lr * ratio, 'grad_norm': gn}, prefix='VAE_opt/')
                tb.scalars(g_it, {f'scale{si}_pn{pn}': u for si, (pn, u) in enumerate(zip(args.patch_nums, usages))},
                           prefix='VAE_usage/')
                tb.scalars(g_it, gan, prefix='VAE_gan/')
    return usages


# ============================================== end of an epoch: validation, grids, checkpoint ========================
@torch.no_grad()
def validate(run: Run, vae: VQVAE, ld_val, vis_B3HW):
    """Reconstruction metrics on the validation set (eval mode: the usage EMA is not touched), the share of the
    codebook hit per scale, and a grid: inputs, then the reconstruction after each scale -> (metrics, grid, None),
    or (None, None, why) when an image was unreadable on some rank."""
    dev, K, V = run.dev, len(vae.quantize.v_patch_nums), vae.vocab_size

    def batch_sums(batch):          # L1, MSE, PSNR, n, then the hits of every code at every scale
        img = batch[0].to(dev, non_blocking=True)
        hits = [idx.flatten().bincount(minlength=V).double() for idx in vae.img_to_idxBl(img)]
        rec = vae.img_to_reconstructed_img(img, last_one=True)
        mse_B = (rec - img).square().mean(dim=(1, 2, 3))
        return torch.cat([torch.stack([(rec - img).abs().mean(dim=(1, 2, 3)).sum(), mse_B.sum(),
                                       (10 * torch.log10(4.0 / mse_B.clamp_min(1e-10))).sum()]).double(),  # peak-to-peak 2
                          torch.tensor([float(img.shape[0])], dtype=torch.float64, device=dev), *hits])

    vae.eval()
    sums, bad = training.eval_sums(run, ld_val, batch_sums)
    grid = None
    if sums is not None and vis_B3HW is not None:
        vis = vis_B3HW.to(dev)
        grid = to_png(torch.cat([vis] + vae.img_to_reconstructed_img(vis)).cpu(), nrow=vis.shape[0])
    vae.train()
    if sums is None:
        return None, None, bad
    l1, mse, psnr = (sums[:3] / max(sums[3].item(), 1e-12)).tolist()
    used = (sums[4:].view(K, V) > 0).float().mean(dim=1).mul(100).tolist()
    return {'val_L1': l1, 'val_MSE': mse, 'val_PSNR': psnr, 'val_code_used_pct': used}, grid, None


def to_png(img_B3HW: torch.Tensor, nrow: int, pad: int = 2):
    """Images in [-1, 1] -> (PNG bytes of a grid with ``nrow`` images per row, height, width)."""
    from PIL import Image
    B, _, H, W = img_B3HW.shape
    grid = torch.ones(3, math.ceil(B / nrow) * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img_B3HW[i].add(1).mul(0.5)
    arr = grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue(), arr.shape[0], arr.shape[1]


def end_of_epoch(run: Run, t: Trainer, ep: int, usages, ld_val, vis, t_run: float, datasets):
    """log.txt / TensorBoard / console; every ``--save_freq`` epochs (and at the end, and on preemption) validation,
    a reconstruction grid and a checkpoint."""
    args, tb = run.args, run.tb
    stop_now, = training.agree(run.dev, run.stop.signame)
    s = t.ep_sums.mean_over_ranks()
    n = max(s['iters'], 1)
    rec_ep = {'kind': 'epoch', 'ep': ep + 1, 'loss': s['loss'] / n, 'rec_mse': s['rec_mse'] / n, 'vq': s['vq'] / n,
              'grad_norm': s['grad_norm'] / n, 'usage_pct': [round(u, 2) for u in usages],
              'elapsed_s': round(time.time() - t_run, 1)}
    if args.skip_bad_images:
        training.report_bad_images(run, datasets)
    metrics = None
    if (ep + 1) % args.save_freq == 0 or ep + 1 == args.ep or stop_now:
        metrics, grid, bad = validate(run, t.vae, ld_val, vis)
        if metrics is None:
            t.ep_sums.zero_()
            save_checkpoint(run, t, ep + 1, 0)
            raise training.data_error(bad, f'validation of epoch {ep + 1}; checkpoint saved at the end of the epoch')
        rec_ep.update(metrics)
        if dist.is_master() and grid is not None:
            png, h, w = grid
            atomic_write_bytes(png, run.path('recon', f'ep{ep + 1:04d}.png'))
            if tb:
                tb.add_png('VAE_recon/inputs_then_scales', png, h, w, ep + 1)
        if tb:
            tb.scalars(ep + 1, {k: metrics[k] for k in ('val_L1', 'val_MSE', 'val_PSNR')}, prefix='VAE_val/')
            tb.scalars(ep + 1, {f'code_used_pct_scale{si}': u for si, u in enumerate(metrics['val_code_used_pct'])},
                       prefix='VAE_val/')
    if tb:
        tb.scalars(ep + 1, {k: rec_ep[k] for k in ('loss', 'rec_mse', 'vq')}, prefix='VAE_ep/')
        tb.flush()
    if dist.is_master():
        training.append_json_line(run.path('log.txt'), rec_ep)
    val_txt = (f"  val: L1 {metrics['val_L1']:.4f} MSE {metrics['val_MSE']:.4f} PSNR {metrics['val_PSNR']:.2f} dB  "
               f"codes used% [{' '.join(f'{u:.0f}' for u in metrics['val_code_used_pct'])}]") if metrics else ''
    run.log.info(f'     [ep {ep + 1}] train rec_mse {rec_ep["rec_mse"]:.4f} vq {rec_ep["vq"]:.4f}{val_txt}')
    if metrics is not None:
        t.ep_sums.zero_()
        save_checkpoint(run, t, ep + 1, 0, metrics['val_MSE'])
    if stop_now:
        raise run.stopped(f'at the end of epoch {ep + 1} ({run.path("vae-ckpt-last.pth")})')


def run(argv=None) -> int:
    return training.cli(main, parse_vae_args, argv, prog='train_vae.py', oom_hint=lambda args: (
        f'lower --bs (per-rank batch {getattr(args, "batch_size", "?")} images)'))


if __name__ == '__main__':
    sys.exit(run())
