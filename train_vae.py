"""Trains the multi-scale residual VQVAE tokenizer of VAR / VIAR (the piece the official code never released), or with
``--flex`` FlexVAR's FlexVAE tokenizer.

    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --pn 256 --ch 160 --vocab_size 4096 \
        --z_channels 32 --bs 256 --ep 100 --lr 1e-4 --lp 1.0 --disc 0.1     # the published tokenizer's architecture
    python train_vae.py --data_path demo_output/data --pn 1_2_3_4 --ch 32 --vocab_size 256 --z_channels 16 ...

Loss = l2 * MSE + l1 * L1 + vq loss [+ lp * perceptual (VGG16) + disc * hinge-GAN (PatchGAN)]; the loss networks and
the codebook restarts are in ``models/vq_losses.py``.  ``--flex`` also decodes one smaller scale per step at its own
size.  What differs between the two tokenizers is chosen once (``Recipe``, ``FlexRecipe``).  Writes
``vae-ckpt-last.pth`` (resumed by rerunning the same command) and the tokenizer train.py, sampling.py and
``models.checkpoint.load_vae`` read.  Details: docs/tokenizer.md.
"""
import io
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, NamedTuple, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from models import VQVAE, FlexVAE
from models.checkpoint import load_vae
from models.vq_losses import PatchDiscriminator, VGGPerceptual, restart_dead_codes
from utils import dist, train_state, training
from utils.arg_util import parse_vae_args
from utils.data import DataError, ResumableBatchSampler, ShardSampler, build_dataset
from utils.errors import UserError, one_line
from utils.lr_control import lr_ratio
from utils.misc import atomic_write_bytes
from utils.model_io import CheckpointError, model_errors
from utils.train_config import config_to_dict, vae_config
from utils.training import Batches, Pace, Run, Sums

ARCH_FLAGS = ('flex', 'vocab_size', 'z_channels', 'codebook_dim', 'ch', 'ch_mult', 'num_res_blocks', 'attn',
              'norm_groups', 'pn', 'share_quant_resi', 'quant_resi', 'disc_ch')     # the tokenizer family first
EPOCH_SUMS = ('loss', 'rec_mse', 'vq', 'iters', 'grad_norm', 'skipped')


class Out(NamedTuple):
    """What a recipe's training forward gives the losses."""
    rec: torch.Tensor                   # reconstruction of the full-resolution tokens (B, 3, H, W)
    vq_loss: torch.Tensor
    usages: Optional[list]              # codebook usage % per scale (logged iterations only)
    small: Optional[tuple] = None       # FlexVAE: (scale side, its reconstruction, the image area-resized to its size)


class Recipe:
    """VAR's multi-scale residual VQVAE (``VQVAE.forward``).  What differs between the tokenizers train_vae.py trains
    is chosen once, here or in ``FlexRecipe`` (as train.py's ``Feed`` / ``FlexFeed``)."""
    flex = False
    sums = EPOCH_SUMS
    # names, filled in from the flags (str.format): the log's description, the exported file, the TensorBoard folder
    describe_fmt = 'VQVAE ch={ch} V={vocab_size} Cvae={z_channels}'
    export_fmt = 'vae_ch{ch}v{vocab_size}z{z_channels}.pth'
    tb_fmt = 'tb-VAE_ch{ch}v{vocab_size}z{z_channels}__pn{pn}'

    def build(self, args) -> VQVAE:
        return VQVAE(vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, beta=args.beta,
                     share_quant_resi=args.share_quant_resi, quant_resi=args.quant_resi,
                     v_patch_nums=tuple(args.patch_nums), test_mode=False, ch_mult=args.ch_mult,
                     num_res_blocks=args.num_res_blocks, using_sa=args.attn, using_mid_sa=args.attn,
                     norm_groups=args.norm_groups)

    def describe(self, args) -> str:
        return self.describe_fmt.format_map(vars(args))

    @classmethod
    def export_name(cls, args) -> str:
        return cls.export_fmt.format_map(vars(args))

    def tb_name(self, args) -> str:
        return self.tb_fmt.format_map(vars(args))

    def export(self, sd: dict, vae_config: dict):
        """The official bare state dict when the keys tell the whole architecture (norm_groups 32)."""
        return sd if vae_config['norm_groups'] == 32 else {'trainer': {'vae_wo_ddp': sd}, 'vae_config': vae_config}

    def unused_params(self, args, vae) -> bool:
        """Whether some parameters get no gradient in some steps (DDP must look for them)."""
        K = len(args.patch_nums)            # with few scales some phi convs get no gradient
        used = {id(vae.quantize.phi(si, K)) for si in range(K)}
        return args.ae_warmup > 0 or any(isinstance(m, torch.nn.Conv2d) and id(m) not in used
                                         for m in vae.quantize.quant_resi.modules())

    def forward(self, t: 'Trainer', img: torch.Tensor, warm: bool, log_now: bool) -> Out:
        rec, usages, vq_loss = t.model(img, ret_usages=log_now, quantize=not warm)
        return Out(rec, vq_loss, usages)

    def hits(self, vae) -> Optional[torch.Tensor]:
        """The EMA codebook hits per scale that ``restart_dead_codes`` reads (None: the VQVAE's own buffer)."""
        return None

    def forget_hits(self, vae):
        vae.quantize.ema_vocab_hit_SV.zero_()

    def resume_state(self, vae) -> dict:
        return {'record_hit': vae.quantize.record_hit}

    def load_resume(self, vae, res: dict):
        vae.quantize.record_hit = int(res.get('record_hit', 1))

    @torch.no_grad()
    def val_batch(self, vae, img):
        """(token maps of every scale, reconstruction, per-scale MSE sums over the batch or None)."""
        return vae.img_to_idxBl(img), vae.img_to_reconstructed_img(img, last_one=True), None

    @torch.no_grad()
    def grid_rows(self, vae, vis) -> List[torch.Tensor]:
        """The reconstruction rows of the grid: after scale 1, 2, ..., K."""
        return vae.img_to_reconstructed_img(vis)


class FlexRecipe(Recipe):
    """FlexVAR's FlexVAE (``FlexVAE.forward``): every step the full map and one smaller scale of --pn drawn from the
    generator every rank shares; its own codebook-usage EMA per scale (the published layout has no such buffer)."""
    flex = True
    sums = EPOCH_SUMS + ('ms_mse', 'ms_steps')
    describe_fmt = 'FlexVAE ch={ch} z_channels={z_channels} V={vocab_size} Cvae={codebook_dim} (ms_weight {ms_weight})'
    export_fmt = 'FlexVAE_ch{ch}z{z_channels}v{vocab_size}c{codebook_dim}.pth'
    tb_fmt = 'tb-FlexVAE_ch{ch}z{z_channels}v{vocab_size}c{codebook_dim}__pn{pn}'

    def __init__(self, args, dev):
        K, V = len(args.patch_nums), args.vocab_size
        self.hits_SV = torch.zeros(K, V, device=dev)
        self.n_hits = [0] * K               # updates of each scale's EMA

    def build(self, args) -> FlexVAE:
        return FlexVAE(vocab_size=args.vocab_size, Cvae=args.codebook_dim, ch=args.ch, z_channels=args.z_channels,
                       ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks, norm_groups=args.norm_groups,
                       v_patch_nums=tuple(args.patch_nums), test_mode=False)

    def export(self, sd: dict, vae_config: dict):
        """The published FlexVAE's format ``{'model': state dict}``, with the config the keys cannot tell when it is
        not the published one."""
        return {'model': sd} if vae_config['norm_groups'] == 32 else {'model': sd, 'vae_config': vae_config}

    def unused_params(self, args, vae) -> bool:
        return args.ae_warmup > 0          # the codebook gets no gradient in the warm-up

    def forward(self, t: 'Trainer', img: torch.Tensor, warm: bool, log_now: bool) -> Out:
        args = t.args
        K = len(args.patch_nums)
        si = int(torch.randint(K - 1, (1,), generator=t.gen))     # drawn every step: the stream never depends on flags
        small = args.patch_nums[si] if args.ms_weight > 0 else None
        out = t.model(img, small_pn=small, beta=args.beta, quantize=not warm)
        if out.idx:
            self.count_hits(out.idx, [K - 1, si][:len(out.idx)])
        usages = None
        if log_now:
            world = dist.get_world_size()
            margins = [world * img.shape[0] * pn * pn / args.vocab_size * 0.08 for pn in args.patch_nums]
            usages = [(self.hits_SV[k] >= m).float().mean().item() * 100 for k, m in enumerate(margins)]
        if small is None:
            return Out(out.rec, out.vq_loss, usages)
        target = F.interpolate(img, size=out.rec_small.shape[-2:], mode='area')
        return Out(out.rec, out.vq_loss, usages, (small, out.rec_small, target))

    @torch.no_grad()
    def count_hits(self, idx: List[torch.Tensor], scales: List[int]):
        """EMA of the codes hit at each quantised scale, summed over ranks (VQVAE's rates: 0.9 for 100 updates, then
        0.99)."""
        hit_nV = torch.stack([i.bincount(minlength=self.hits_SV.shape[1]).float() for i in idx])
        if dist.initialized():
            tdist.all_reduce(hit_nV)
        for k, hit_V in zip(scales, hit_nV):
            n = self.n_hits[k]
            if n == 0:
                self.hits_SV[k].copy_(hit_V)
            else:
                rate = 0.1 if n < 100 else 0.01
                self.hits_SV[k].mul_(1 - rate).add_(hit_V.mul(rate))
            self.n_hits[k] = n + 1

    def hits(self, vae) -> Optional[torch.Tensor]:
        return self.hits_SV

    def forget_hits(self, vae):
        self.hits_SV.zero_()

    def resume_state(self, vae) -> dict:
        return {'hits_SV': self.hits_SV.cpu(), 'n_hits': torch.tensor(self.n_hits)}

    def load_resume(self, vae, res: dict):
        if 'hits_SV' in res and res['hits_SV'].shape == self.hits_SV.shape:
            self.hits_SV.copy_(res['hits_SV'])
            self.n_hits = [int(n) for n in res['n_hits']]

    @torch.no_grad()
    def val_batch(self, vae, img):
        """Every scale decoded at its own size: the full one is the reconstruction, each scale's MSE is against the
        image area-resized to its size."""
        idx = vae.img_to_idxBl(img)
        recs = vae.idxBl_to_img(idx, last_one=False)
        mse = torch.stack([(r - F.interpolate(img, size=r.shape[-2:], mode='area')).square().mean(dim=(1, 2, 3)).sum()
                           for r in recs])
        return idx, recs[-1], mse

    @torch.no_grad()
    def grid_rows(self, vae, vis) -> List[torch.Tensor]:
        """Each scale's image (decoded at its own size), bicubic-upsampled to the full size as FlexVAR shows them."""
        H = vis.shape[-1]
        return [F.interpolate(r, size=(H, H), mode='bicubic').clamp(-1, 1)
                for r in vae.idxBl_to_img(vae.img_to_idxBl(vis), last_one=False)]


@dataclass
class Trainer:
    """The tokenizer and its loss networks and optimisers, and the progress a checkpoint restores."""
    args: Any
    recipe: Recipe                      # the tokenizer family's differences
    vae: Any                            # VQVAE or FlexVAE
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
    metrics: torch.Tensor               # this rank's loss, rec MSE, vq loss (FlexVAE: and the smaller scale's MSE)
    usages: list                        # codebook usage % per scale (logged iterations only)
    grad_norm: Optional[float]          # None: non-finite, the step was skipped
    g_loss: Optional[torch.Tensor]
    d_loss: Optional[torch.Tensor]
    small_pn: Optional[int] = None      # FlexVAE: the smaller scale of this step


def train(flags):
    """Trains the tokenizer for ``--ep`` epochs, resuming from ``vae-ckpt-last.pth`` when the run folder has one; the
    configuration (``utils.train_config``) is made once from ``flags`` and the number of processes."""
    run = training.start(flags, 'train_vae.py', subdirs=() if flags.check_data else ('recon',))
    world = dist.get_world_size()
    if flags.bs < world:
        raise UserError(f'--bs {flags.bs} is smaller than the {world} processes: each needs at least one image')
    args = run.args = vae_config(flags, world)
    saved = find_checkpoint(run)

    # ---- data ----
    classes, train_set, val_set = build_dataset(args.data_path, args.data_load_reso, hflip=args.hflip,
                                                mid_reso=args.mid_reso, skip_bad=args.skip_bad_images,
                                                allow_empty=args.check_data)
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
    try:
        vis = torch.stack([val_set[i * step][0] for i in range(n_vis)]) if dist.is_master() and n_vis else None
    except DataError as e:
        where = ('reading the validation images of the reconstruction grid, before the first step: nothing was '
                 'trained; --check_data lists every unreadable image at once, --skip_bad_images replaces them')
        raise DataError(f'{one_line(e)} [{where}]') from e
    run.log.info(f'[data] {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, '
                 f'{args.data_load_reso} px, scales {args.pn}; per-rank batch {args.batch_size}, '
                 f'{sampler.iters_per_epoch} iterations per epoch, {args.workers} loader worker(s) per process')

    # ---- models, optimisers, progress ----
    t = build_trainer(run, saved)
    t.iters = sampler.iters_per_epoch
    restore_progress(run, t, saved)
    del saved
    if t.start_ep >= args.ep:
        run.log.info(f'[train_vae] nothing to do: {run.path("vae-ckpt-last.pth")} already holds {t.start_ep} epochs '
                     f'(--ep {args.ep}); the tokenizer is {export_path(run)}')
        return
    if dist.is_master():
        run.tb = training.TBWriter(run.path(t.recipe.tb_name(args)), purge_step=t.start_ep * t.iters + t.start_it)

    # ---- the epochs ----
    t_run = time.time()
    for ep, first in training.epochs(t, sampler, args.ep):
        usages = train_one_epoch(run, t, ep, first, ld_train)
        end_of_epoch(run, t, ep, usages, ld_val, vis, t_run, (train_set, val_set))
    run.log.info(f'[train_vae] done in {timedelta(seconds=int(time.time() - t_run))}; tokenizer '
                 f'{"(official format) " if args.norm_groups == 32 else ""}{export_path(run)}; reconstructions in '
                 f'{run.path("recon")}')
    if run.tb:
        run.tb.close()


def export_path(run: Run) -> str:
    return run.path((FlexRecipe if run.args.flex else Recipe).export_name(run.args))


def find_checkpoint(run: Run) -> Optional[train_state.Saved]:
    """``vae-ckpt-last.pth`` of the run folder (None for a new run), checked against this command's flags."""
    path = run.path('vae-ckpt-last.pth')
    saved = train_state.load('vae', path)
    if saved:
        training.check_same_flags(saved.args, config_to_dict(run.args), ARCH_FLAGS, path)
    return saved


def build_trainer(run: Run, saved: Optional[train_state.Saved]) -> Trainer:
    """The tokenizer of the recipe (VQVAE, or FlexVAE with --flex; from scratch, ``--init`` or the checkpoint),
    optional discriminator and perceptual loss, AdamW optimisers (betas 0.5/0.9; no decay on biases, norms and the
    codebook), GradScaler, DDP."""
    args, dev = run.args, run.dev
    recipe = FlexRecipe(args, dev) if args.flex else Recipe()
    torch.manual_seed(args.seed)
    vae = recipe.build(args).to(dev)
    vae.init_weights()
    if args.init and not saved:
        with model_errors():
            src = load_vae(args.init, 'cpu', patch_nums=tuple(args.patch_nums))
        try:
            vae.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'--init {args.init!r} does not fit --flex/--ch/--vocab_size/--z_channels'
                                  f'{"/--codebook_dim" if args.flex else ""} ({str(e).splitlines()[0]})') from e
    vae.train()
    disc = PatchDiscriminator(args.disc_ch).to(dev).train() if args.disc > 0 else None
    perc = None
    if args.lp > 0:
        with model_errors():
            if dist.is_master():
                perc = VGGPerceptual()      # rank 0 downloads into the cache first (or fails for everyone below)
            dist.barrier()
            perc = (perc or VGGPerceptual()).to(dev)
    no_decay = lambda n, p: p.ndim <= 1 or n.endswith('.bias') or 'quantize.embedding' in n
    groups = [{'params': [p for n, p in vae.named_parameters() if not no_decay(n, p)], 'weight_decay': args.wd},
              {'params': [p for n, p in vae.named_parameters() if no_decay(n, p)], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0) if disc else None
    if saved:
        try:
            vae.load_state_dict(saved.weights['vae_wo_ddp'], strict=True)
            opt.load_state_dict(saved.optim['vae_opt'])
            if disc is not None and 'disc' in saved.weights:
                disc.load_state_dict(saved.weights['disc'])
                opt_d.load_state_dict(saved.optim['disc_opt'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{run.path("vae-ckpt-last.pth")!r} does not fit this command '
                                  f'({str(e).splitlines()[0]}); pass another --local_out_dir_path to start a new '
                                  f'run') from e
    run.log.info(f'[model] {recipe.describe(args)}: '
                 f'{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters; losses: l2 {args.l2} l1 {args.l1} '
                 f'vq (beta {args.beta}) lp {args.lp} disc {args.disc}')
    return Trainer(args=args, recipe=recipe, vae=vae,
                   model=training.wrap_ddp(vae, dev, find_unused=recipe.unused_params(args, vae)),
                   disc=training.wrap_ddp(disc, dev) if disc is not None else None, perc=perc, opt=opt, opt_d=opt_d,
                   scaler=torch.amp.GradScaler('cuda') if run.amp_dtype is torch.float16 else None,
                   gen=torch.Generator().manual_seed(args.seed + 12345), ep_sums=Sums(recipe.sums, dev))


def restore_progress(run: Run, t: Trainer, saved: Optional[train_state.Saved]):
    """Schedule position, best validation MSE, epoch sums, RNG states, the generator of code restarts (and FlexVAE's
    scale draws) and the codebook-usage statistics."""
    if not saved:
        return
    t.start_ep, t.start_it, res = saved.epoch, saved.it, saved.resume
    t.recipe.load_resume(t.vae, res)
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
    the validation MSE improved), atomically.  The export (``Recipe.export``) is the official format when the keys
    tell the whole architecture (norm_groups 32): VQVAE a bare state dict, FlexVAE ``{'model': state dict}``; else
    with ``'vae_config': {'norm_groups': G}`` beside the weights (``models.checkpoint.load_vae`` reads all of them).
    Returns whether the MSE improved.  Before the first optimizer step nothing is written: an export of untrained
    weights would pass for a tokenizer."""
    args, vae = run.args, t.vae
    if ep == 0 and it == 0:
        return False
    improved = val_mse is not None and val_mse < t.best
    t.best = min(t.best, val_mse) if val_mse is not None else t.best
    rngs, rank_sums = training.gather_object(training.rng_state(run.dev)), training.gather_tensor(t.ep_sums.t)
    if dist.get_local_rank() == 0:
        vae_config = {'norm_groups': args.norm_groups}
        weights, optim = {'vae_wo_ddp': vae.state_dict()}, {'vae_opt': t.opt.state_dict()}
        if t.disc is not None:
            weights['disc'], optim['disc_opt'] = getattr(t.disc, 'module', t.disc).state_dict(), t.opt_d.state_dict()
        state = train_state.pack('vae', train_state.Saved(
            epoch=ep, it=it, weights=weights, optim=optim, config=vae_config, args=config_to_dict(args),
            resume={'rng': rngs, 'gen': t.gen.get_state(), **t.recipe.resume_state(vae), 'best': t.best,
                    'bad_in_a_row': t.bad_in_a_row, 'rank_ep_sums': rank_sums}))
        training.write_checkpoint(state, run.path('vae-ckpt-last.pth'))
        training.write_checkpoint(t.recipe.export(vae.state_dict(), vae_config), export_path(run),
                                  run.path('vae-best.pth') if improved else None)
    dist.barrier()
    return improved


# ============================================== one epoch =============================================================
def train_step(run: Run, t: Trainer, img: torch.Tensor, g_it: int, warm: bool, log_now: bool) -> Step:
    """Forward, losses, backward, optimiser step (then the discriminator's) of one iteration; no host sync besides
    the gradient norm."""
    args, disc = run.args, t.disc
    use_disc = disc is not None and g_it >= int(args.disc_start * args.ep * t.iters)
    with run.autocast():
        out = t.recipe.forward(t, img, warm, log_now)
        rec, vq_loss = out.rec.float(), out.vq_loss
        mse = F.mse_loss(rec, img)
        loss = args.l2 * mse + vq_loss
        if args.l1:
            loss = loss + args.l1 * (rec - img).abs().mean()
        ms_mse = None
        if out.small is not None:       # FlexVAE: one smaller scale, decoded at its own size (pixel losses only)
            _, rec_s, target = out.small
            rec_s = rec_s.float()
            ms_mse = F.mse_loss(rec_s, target)
            ms_loss = args.l2 * ms_mse + (args.l1 * (rec_s - target).abs().mean() if args.l1 else 0)
            loss = loss + args.ms_weight * ms_loss
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
    parts = [loss.detach().float(), mse.detach(), vq_loss.detach().float()]
    if t.recipe.flex:
        parts.append(ms_mse.detach() if ms_mse is not None else mse.new_zeros(()))
    return Step(torch.stack(parts), out.usages or [0.0] * len(args.patch_nums), gn, g_loss, d_loss,
                out.small[0] if out.small is not None else None)


def train_one_epoch(run: Run, t: Trainer, ep: int, first: int, ld_train) -> list:
    """Iterations ``first..`` of epoch ``ep`` with lr schedule, codebook restarts, logging, and at each step
    boundary the ranks' agreement to stop (SIGTERM / Ctrl-C, an unreadable image: save first) -> last usages."""
    args, vae, iters, tb = run.args, t.vae, t.iters, run.tb
    max_it, wp_it = args.ep * iters, args.wp * iters
    log_freq = args.log_freq or max(1, iters // 10)
    batches, pace, usages = Batches(ld_train), Pace(), []
    for it in range(first, iters):
        batch = batches.take(1)         # step boundary: every rank agrees to go on, or saves and stops
        training.step_boundary(run, batches, lambda it=it: save_checkpoint(run, t, ep, it),
                               f'in epoch {ep + 1} after iteration {it}/{iters} ({run.path("vae-ckpt-last.pth")})',
                               untrained=ep * iters + it == 0)
        img = batch[0][0].to(run.dev, non_blocking=True)
        g_it = ep * iters + it
        run.faults.kill(g_it)
        ratio = lr_ratio('cos', g_it, wp_it, max_it, wp0=0.01, wpe=args.lr_end)
        for o in (t.opt, t.opt_d):
            for gr in (o.param_groups if o is not None else ()):
                gr['lr'] = args.lr * ratio
        warm = ep < args.ae_warmup
        if args.ae_warmup and g_it == args.ae_warmup * iters:   # the warm-up ends: codes from encoder outputs
            with torch.no_grad():
                t.recipe.forget_hits(vae)
                n_seeded = restart_dead_codes(vae, vae.img_to_f(img), t.gen, t.recipe.hits(vae))
                run.log.info(f'[codebook] seeded {n_seeded} codes from encoder outputs')
        log_now = it == first or (it + 1) % log_freq == 0 or it + 1 == iters
        s = train_step(run, t, img, g_it, warm, log_now)
        if args.code_restart and not warm and (g_it + 1) % args.code_restart == 0 and g_it + 1 < max_it:
            with torch.no_grad():
                n_re = restart_dead_codes(vae, vae.img_to_f(img), t.gen, t.recipe.hits(vae))
            if n_re and g_it + 1 < max_it * 0.8:
                run.log.info(f'[codebook] re-seeded {n_re} unused codes')
        if s.grad_norm is None:
            t.bad_in_a_row += 1
            t.ep_sums.inc(skipped=1)
            run.log.info(f'[ep {ep + 1} it {it + 1}] non-finite loss or gradient: step skipped '
                         f'({t.bad_in_a_row} in a row)')
            if t.bad_in_a_row >= args.max_nonfinite:
                raise UserError(f'{t.bad_in_a_row} steps in a row were non-finite: lower --lr or set --clip 1, then '
                                f'rerun (it resumes from {run.path("vae-ckpt-last.pth")} if one was saved)')
        else:
            t.bad_in_a_row = 0
            t.ep_sums.add('loss', s.metrics[:3])
            t.ep_sums.inc(iters=1, grad_norm=s.grad_norm)
            if s.small_pn is not None:
                t.ep_sums.add('ms_mse', s.metrics[3:])
                t.ep_sums.inc(ms_steps=1)
        pace.tick()
        if log_now:     # a collective: every rank logs the same iterations
            loss, rec_mse, vq, *ms = dist.allreduce_mean(s.metrics).tolist()
            usages, gn = s.usages, s.grad_norm if s.grad_norm is not None else float('nan')
            gan = {'G': s.g_loss.item(), 'D': s.d_loss.item()} if s.d_loss is not None else {}
            ms_txt = f'  ms_mse {ms[0]:.4f} (pn {s.small_pn})' if s.small_pn is not None else ''
            run.log.info(f'[ep {ep + 1:3d}/{args.ep}] [{it + 1:4d}/{iters}] eta {pace.left(max_it - g_it - 1)}  loss '
                         f'{loss:.4f}  rec_mse {rec_mse:.4f}  vq {vq:.4f}{ms_txt}  lr {args.lr * ratio:.2e}  '
                         f'gnorm {gn:.2f}  usage% [{" ".join(f"{u:.0f}" for u in usages)}]'
                         + (f'  G {gan["G"]:.3f} D {gan["D"]:.3f}' if gan else ''))
            if tb:
                tb.scalars(g_it, {'loss': loss, 'rec_mse': rec_mse, 'vq_loss': vq,
                                  **({'ms_mse': ms[0]} if s.small_pn is not None else {})}, prefix='VAE_iter/')
                tb.scalars(g_it, {'lr': args.lr * ratio, 'grad_norm': gn}, prefix='VAE_opt/')
                tb.scalars(g_it, {f'scale{si}_pn{pn}': u for si, (pn, u) in enumerate(zip(args.patch_nums, usages))},
                           prefix='VAE_usage/')
                tb.scalars(g_it, gan, prefix='VAE_gan/')
    return usages


# ============================================== end of an epoch: validation, grids, checkpoint ========================
@torch.no_grad()
def validate(run: Run, recipe: Recipe, vae, ld_val, vis_B3HW):
    """Reconstruction metrics on the validation set (eval mode: the usage statistics are not touched), the share of
    the codebook hit per scale (FlexVAE: the MSE of each scale too, decoded at its own size), and a grid: inputs,
    then the reconstruction after (FlexVAE: of) each scale -> (metrics, grid, None), or (None, None, why) when an
    image was unreadable on some rank."""
    dev, K, V = run.dev, len(run.args.patch_nums), vae.vocab_size

    def batch_sums(batch):          # L1, MSE, PSNR, n, then the hits of every code at every scale (, scale MSEs)
        img = batch[0].to(dev, non_blocking=True)
        idx, rec, scale_mse = recipe.val_batch(vae, img)
        hits = [i.flatten().bincount(minlength=V).double() for i in idx]
        mse_B = (rec - img).square().mean(dim=(1, 2, 3))
        psnr_B = 10 * torch.log10(4.0 / mse_B.clamp_min(1e-10))        # peak-to-peak 2
        l1 = (rec - img).abs().mean(dim=(1, 2, 3)).sum()
        return torch.cat([torch.stack([l1, mse_B.sum(), psnr_B.sum()]).double(),
                          torch.tensor([float(img.shape[0])], dtype=torch.float64, device=dev), *hits,
                          *([] if scale_mse is None else [scale_mse.double()])])

    vae.eval()
    sums, bad = training.eval_sums(run, ld_val, batch_sums)
    grid = None
    if sums is not None and vis_B3HW is not None:
        vis = vis_B3HW.to(dev)
        grid = to_png(torch.cat([vis] + recipe.grid_rows(vae, vis)).cpu(), nrow=vis.shape[0])
    vae.train()
    if sums is None:
        return None, None, bad
    n = max(sums[3].item(), 1e-12)
    l1, mse, psnr = (sums[:3] / n).tolist()
    used = (sums[4:4 + K * V].view(K, V) > 0).float().mean(dim=1).mul(100).tolist()
    metrics = {'val_L1': l1, 'val_MSE': mse, 'val_PSNR': psnr, 'val_code_used_pct': used}
    if sums.numel() > 4 + K * V:
        metrics['val_MSE_scales'] = (sums[4 + K * V:] / n).tolist()
    return metrics, grid, None


def to_png(img_B3HW: torch.Tensor, nrow: int, pad: int = 2):
    """Images in [-1, 1] -> (PNG bytes of a grid with ``nrow`` images per row, height, width)."""
    from PIL import Image
    B, _, H, W = img_B3HW.shape
    grid = torch.ones(3, math.ceil(B / nrow) * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = img_B3HW[i].add(1).mul(0.5)
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
    if 'ms_mse' in s:
        rec_ep['ms_mse'] = s['ms_mse'] / max(s['ms_steps'], 1)
    if args.skip_bad_images:
        training.report_bad_images(run, datasets)
    metrics = None
    if (ep + 1) % args.save_freq == 0 or ep + 1 == args.ep or stop_now:
        metrics, grid, bad = validate(run, t.recipe, t.vae, ld_val, vis)
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
            tb.scalars(ep + 1, {f'MSE_scale{si}_pn{pn}': v for si, (pn, v) in
                                enumerate(zip(args.patch_nums, metrics.get('val_MSE_scales', [])))}, prefix='VAE_val/')
    if tb:
        tb.scalars(ep + 1, {k: rec_ep[k] for k in ('loss', 'rec_mse', 'vq', 'ms_mse') if k in rec_ep}, prefix='VAE_ep/')
        tb.flush()
    if dist.is_master():
        training.append_json_line(run.path('log.txt'), rec_ep)
    val_txt = (f"  val: L1 {metrics['val_L1']:.4f} MSE {metrics['val_MSE']:.4f} PSNR {metrics['val_PSNR']:.2f} dB  "
               f"codes used% [{' '.join(f'{u:.0f}' for u in metrics['val_code_used_pct'])}]") if metrics else ''
    if metrics and 'val_MSE_scales' in metrics:
        val_txt += f"  MSE per scale [{' '.join(f'{v:.4f}' for v in metrics['val_MSE_scales'])}]"
    ms_txt = f' ms_mse {rec_ep["ms_mse"]:.4f}' if 'ms_mse' in rec_ep else ''
    run.log.info(f'     [ep {ep + 1}] train rec_mse {rec_ep["rec_mse"]:.4f} vq {rec_ep["vq"]:.4f}{ms_txt}{val_txt}')
    if metrics is not None:
        t.ep_sums.zero_()
        save_checkpoint(run, t, ep + 1, 0, metrics['val_MSE'])
    if stop_now:
        raise run.stopped(f'at the end of epoch {ep + 1} ({run.path("vae-ckpt-last.pth")})')


def main(argv=None) -> int:
    """``python train_vae.py ARGV``: trains (``train``); the exit status (0 done, 1 after one error line, 143 stopped
    by a signal after saving)."""
    return training.cli(train, parse_vae_args, argv, prog='train_vae.py', oom_hint=lambda args: (
        f'lower --bs (per-rank batch {getattr(args, "batch_size", "?")} images)'))


if __name__ == '__main__':
    raise SystemExit(main())
