"""Trains VAR, or VIAR with ``--use_implicit``, on an ImageNet-style folder with a frozen VQVAE tokenizer; FlexVAR
with ``--flex`` (and an implicit FlexVAR with both) on its FlexVAE tokenizer.

    torchrun --nproc_per_node=8 train.py --data_path=/path/to/imagenet-1k --depth=30 --bs=512 --ep=550 \
        --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08 --use_implicit=True --p_depth=5

Teacher forcing: the tokenizer turns each image into its multi-scale token maps, the transformer predicts every
token from the class and the earlier scales (cross-entropy averaged over the tokens); VIAR trains its implicit block
with Jacobian-free backprop, (n0, n1) drawn per iteration from one seeded generator all ranks share.  What a step
feeds the model is the one difference between the families, chosen once (``Feed``, ``FlexFeed``).  Rerunning the
same command resumes exactly from ``ar-ckpt-last.pth``.  The harness (logging, steps, preemption) is
``utils/training.py``, the configuration ``utils/train_config.py``, the checkpoint layout ``utils/train_state.py``.
Details: docs/training.md.
"""
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from models import FlexVAE, build_var, flex_train_schedule_for
from models.checkpoint import describe_classes, load_vae, tokenizer_downsample
from utils import dist, train_state, training
from utils.arg_util import parse_args
from utils.data import DataError, ResumableBatchSampler, ShardSampler, build_dataset
from utils.errors import UserError
from utils.lr_control import check_schedule, lr_wd_annealing, param_groups
from utils.model_io import CheckpointError, model_errors
from utils.train_config import config_to_dict, train_config, train_values
from utils.training import Batches, Pace, Run, Sums
from utils.zoo import FLEX_TOKENIZER, VAR_TOKENIZER, hf_url

ARCH_FLAGS = ('depth', 'use_implicit', 'p_depth', 'pn', 'saln', 'anorm', 'num_classes', 'flex')  # a resume keeps them
VAE_ID_KEYS = ('quantize.embedding.weight', 'quant_conv.weight', 'quant_conv.bias', 'encoder.conv_in.weight',
               'encoder.conv_out.weight', 'decoder.conv_out.weight')     # their bytes identify the tokenizer
EPOCH_SUMS = ('L_mean', 'L_tail', 'acc_mean', 'acc_tail', 'iters', 'skipped', 'grad_norm', 'steps')


def vae_hint(flex: bool) -> str:
    return (f'download it from {hf_url(FLEX_TOKENIZER if flex else VAR_TOKENIZER)} and place it in ckpts/ '
            f'(or pass --vae_ckpt /path/to/it)')


class Step(NamedTuple):
    """What one iteration feeds the model besides the images: its scales and, implicit backbone, (n0, n1)."""
    patch_nums: Tuple[int, ...]
    iters: Optional[Tuple[int, int]]


class Feed:
    """VAR / VIAR: the model's fixed scales; VIAR's (n0, n1) drawn from the generator all ranks share."""
    flex = False

    def __init__(self, var_wo_ddp):
        self.patch_nums, self.backbone = tuple(var_wo_ddp.patch_nums), var_wo_ddp.backbone

    def draw(self, rng: random.Random) -> Step:
        return Step(self.patch_nums, self.backbone.draw_iters(rng))

    def tokens(self, vae, img: torch.Tensor, pns: Tuple[int, ...]):
        """(token maps of every scale, teacher-forcing input (B, L - 1, Cvae)) of ``img``, without gradient."""
        gt_idx_Bl = vae.img_to_idxBl(img)
        return gt_idx_Bl, vae.quantize.idxBl_to_var_input(gt_idx_Bl)

    def logits(self, var, label: torch.Tensor, x_BLCv: torch.Tensor, step: Step) -> torch.Tensor:
        return var(label, x_BLCv, **({'iters': step.iters} if step.iters else {}))


class FlexFeed(Feed):
    """FlexVAR: a random schedule per iteration (``flex_train_schedule_for`` of ``--pn``, then the backbone's draw),
    its token maps and teacher-forcing input, the model called with it."""
    flex = True

    def draw(self, rng: random.Random) -> Step:
        pns = tuple(flex_train_schedule_for(rng, self.patch_nums))
        return Step(pns, self.backbone.draw_iters(rng))

    def tokens(self, vae, img: torch.Tensor, pns: Tuple[int, ...]):
        gt_idx_Bl = vae.img_to_idxBl(img, pns)
        return gt_idx_Bl, vae.quantize.idxBl_to_var_input(gt_idx_Bl, pns)

    def logits(self, var, label: torch.Tensor, x_BLCv: torch.Tensor, step: Step) -> torch.Tensor:
        return var(label, x_BLCv, step.patch_nums, **({'iters': step.iters} if step.iters else {}))


def build_model(args, vae, dev):
    """The one place the family is chosen: (transformer with the fresh-training initialisation, its ``Feed``).
    ``--flex`` needs FlexVAR's tokenizer and the other families VAR's (one sentence otherwise)."""
    if args.flex != isinstance(vae, FlexVAE):
        if args.flex:
            raise CheckpointError(f"--flex trains FlexVAR on FlexVAR's tokenizer, but --vae_ckpt {args.vae_ckpt!r} is "
                                  f"VAR's multi-scale VQVAE: pass {FLEX_TOKENIZER} as --vae_ckpt (or drop --flex)")
        raise CheckpointError(f"--vae_ckpt {args.vae_ckpt!r} is FlexVAR's tokenizer (FlexVAE): add --flex to train "
                              f"FlexVAR, or pass VAR's tokenizer ({VAR_TOKENIZER})")
    feed = FlexFeed if args.flex else Feed
    var_wo_ddp = build_var(
        vae, device=dev, patch_nums=tuple(args.patch_nums), num_classes=args.num_classes, depth=args.depth,
        shared_aln=args.saln, attn_l2_norm=args.anorm, flash_if_available=args.fuse, init_adaln=args.aln,
        init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
        use_implicit=args.use_implicit, pre_depth=args.p_depth, post_depth=args.p_depth).train()
    return var_wo_ddp, feed(var_wo_ddp)


class Stats(NamedTuple):
    """One iteration's metrics (averaged over ranks when read; the TensorBoard tags AR_iter_loss/<name>)."""
    train_loss: float
    L_mean: float
    L_tail: float
    acc_mean: float
    acc_tail: float


@dataclass
class Trainer:
    """The models and optimizer, and the progress a checkpoint restores."""
    vae: Any
    var_wo_ddp: Any
    var: Any                            # var_wo_ddp, or its DDP wrapper
    opt: torch.optim.Optimizer
    scaler: Any                         # GradScaler (fp16) or None
    vae_id: str                         # fingerprint of the tokenizer's weights
    feed: Feed = None                   # what a step feeds the model (the family's one difference)
    iters_train: int = 0
    iters_rng: random.Random = None     # each step's draws (FlexVAR's schedule, VIAR's (n0, n1)), same on every rank
    ep_sums: Sums = None                # this rank's sums over the epoch (EPOCH_SUMS)
    start_ep: int = 0
    start_it: int = 0
    best_val_tail: float = float('inf')
    nonfinite_in_a_row: int = 0
    last_save_g_it: int = 0
    datasets: tuple = ()
    class_names: tuple = ()             # label -> class folder name (sorted folder names of train/)


def train(flags):
    """Trains until ``--ep`` epochs are done, resuming from ``ar-ckpt-last.pth`` when the run folder has one.  The
    configuration (``utils.train_config``) is made once from ``flags``, the run's seed and the classes of the data."""
    run = training.start(flags, 'train.py')                 # processes, run folder, logger, SIGTERM -> save, precision
    try:
        values = train_values(flags, dist.get_world_size(), downsample=tokenizer_downsample(flags.vae_ckpt))
        check_schedule(flags.sche)
    except ValueError as e:
        raise UserError(str(e)) from e
    glb = values['glb_batch_size']
    run.log.info(f'[train] world size {dist.get_world_size()}, device {run.dev}, per-rank batch '
                 f'{values["batch_size"]}, global batch {glb} x ac {flags.ac} = {glb * flags.ac}, '
                 f'lr {values["tlr"]:.3g}')
    saved, seed = find_checkpoint(run)

    # ---- data: checked before any model is built ----
    classes, train_set, val_set = build_dataset(flags.data_path, values['data_load_reso'], hflip=flags.hflip,
                                                mid_reso=flags.mid_reso, skip_bad=flags.skip_bad_images,
                                                allow_empty=flags.check_data)
    if flags.check_data:
        return training.check_images(run, [train_set, val_set], values['workers'])
    run.log.info(f'[data] classes (label: folder; stored in the checkpoint): {describe_classes(classes)}')
    num_classes = flags.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f'--num_classes {num_classes} is smaller than the {len(classes)} class folders in '
                        f'{os.path.join(flags.data_path, "train")!r}: leave it out or raise it')
    args = run.args = train_config(flags, values, seed=seed, num_classes=num_classes)
    if len(val_set) == 0:
        raise DataError(f'{os.path.join(args.data_path, "val")!r} holds no images')
    run.log.info(f'[data] {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, '
                 f'{args.data_load_reso} px, {args.workers} loader worker(s) per process')
    if saved:
        arch = [k for k in ARCH_FLAGS if k != 'p_depth' or args.use_implicit]
        training.check_same_flags(saved.args, config_to_dict(args), arch, run.path('ar-ckpt-last.pth'))

    # ---- models, optimizer, progress; loaders whose order and augmentations replay exactly on resume ----
    t = build_trainer(run, saved)
    t.datasets, t.class_names = (train_set, val_set), tuple(classes)
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, dist.get_rank(), dist.get_world_size(),
                                    seed=args.seed)
    t.iters_train = sampler.iters_per_epoch
    restore_progress(run, t, saved)
    del saved
    ld_train = training.make_loader(train_set, run.dev, args.workers, args.seed, batch_sampler=sampler)
    ld_val = training.make_loader(val_set, run.dev, args.workers, args.seed,
                                  batch_size=max(1, round(args.batch_size * 1.5)),
                                  sampler=ShardSampler(len(val_set), dist.get_rank(), dist.get_world_size()))
    if t.start_ep >= args.ep:
        run.log.info(f'[train] nothing to do: {run.path("ar-ckpt-last.pth")} already holds {t.start_ep} epochs '
                     f'(--ep {args.ep}); raise --ep to train longer')
        return
    if dist.is_master():
        run.tb = training.TBWriter(run.path(args.tb_name), purge_step=t.start_ep * t.iters_train + t.start_it)

    # ---- the epochs ----
    t_start = time.time()
    for ep, first_it in training.epochs(t, sampler, args.ep):
        pace = train_one_epoch(run, t, ep, first_it, ld_train)
        end_of_epoch(run, t, ep, ld_val, pace, t_start)
    run.log.info(f'[train] finished {args.ep} epochs in {timedelta(seconds=int(time.time() - t_start))}; best '
                 f'validation tail loss {t.best_val_tail:.4f}; checkpoints in {args.local_out_dir_path}')
    if run.tb is not None:
        run.tb.close()


def find_checkpoint(run: Run) -> Tuple[Optional[train_state.Saved], int]:
    """The run folder's ``ar-ckpt-last.pth`` (None for a new run), the same on every rank, and the run's seed:
    ``--seed``, else the checkpoint's, else drawn (the same on every rank)."""
    flags = run.args
    saved = train_state.load('var', run.path('ar-ckpt-last.pth'), damaged_hint=', copy ar-ckpt-best.pth over it')
    seed = flags.seed
    if seed is None:
        seed = saved.args.get('seed') if saved else None
        seed = seed if seed is not None else dist.broadcast_object(random.SystemRandom().randrange(2 ** 31))
    elif saved and saved.args.get('seed') not in (None, seed):
        run.log.info(f'[train] note: the checkpoint was trained with --seed {saved.args["seed"]}, continuing with '
                     f'--seed {seed} (data order and randomness change from here)')
    return saved, seed


def build_trainer(run: Run, saved: Optional[train_state.Saved]) -> Trainer:
    """Frozen tokenizer (the checkpoint's own, by fingerprint), transformer (same init on every rank, or the
    checkpoint's weights), DDP, AdamW (betas 0.9/0.95, no decay on 1-D tensors and embeddings), fp16 GradScaler."""
    args, dev, last_path = run.args, run.dev, run.path('ar-ckpt-last.pth')
    with model_errors():
        vae = load_vae(args.vae_ckpt, dev, patch_nums=tuple(args.patch_nums), hint=vae_hint(args.flex))
    vae_id = training.fingerprint(vae.state_dict(), VAE_ID_KEYS)
    if saved:
        saved_id = saved.config.get('vae_fingerprint') or training.fingerprint(saved.weights.get('vae_local', {}),
                                                                               VAE_ID_KEYS)
        if saved_id != vae_id and not args.allow_other_vae:
            raise CheckpointError(
                f'{last_path!r} was trained with another tokenizer than --vae_ckpt {args.vae_ckpt!r} (same shape, '
                f'other weights; the run used {saved.args.get("vae_ckpt")!r}): pass that one as --vae_ckpt to '
                f'resume, or add --allow_other_vae to continue with this one (the token targets, hence the losses, '
                f'change)')
        if saved_id != vae_id:
            run.log.warning(f'[train] note: --allow_other_vae: continuing with the tokenizer {args.vae_ckpt!r}, not '
                            f'the one the checkpoint was trained with (losses change from here)')
    torch.manual_seed(args.seed)
    var_wo_ddp, feed = build_model(args, vae, dev)
    var_wo_ddp.set_grad_checkpointing(args.grad_ckpt)
    opt = torch.optim.AdamW(param_groups(var_wo_ddp)[1], lr=args.tlr, weight_decay=0, betas=(0.9, 0.95),
                            fused=True if dev.type == 'cuda' else None)
    scaler = (torch.amp.GradScaler('cuda', init_scale=2. ** 11, growth_interval=1000)
              if run.amp_dtype is torch.float16 else None)
    if saved:
        try:
            var_wo_ddp.load_state_dict(saved.weights['var_wo_ddp'], strict=True)
            opt.load_state_dict(saved.optim['optimizer'])
            if scaler is not None and saved.optim.get('scaler'):
                scaler.load_state_dict(saved.optim['scaler'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{last_path!r} does not fit the model of this command ({str(e).splitlines()[0]}); '
                                  f'pass another --local_out_dir_path to start a new run') from e
    run.log.info(f'[model] {var_wo_ddp.extra_repr()}: {sum(p.numel() for p in var_wo_ddp.parameters()) / 1e6:.2f}M '
                 f'parameters{", activation checkpointing" if args.grad_ckpt else ""}; tokenizer V={vae.vocab_size} '
                 f'Cvae={vae.Cvae} from {args.vae_ckpt}')
    return Trainer(vae=vae, var_wo_ddp=var_wo_ddp, var=training.wrap_ddp(var_wo_ddp, dev), opt=opt, scaler=scaler,
                   vae_id=vae_id, feed=feed, ep_sums=Sums(EPOCH_SUMS, dev))


def restore_progress(run: Run, t: Trainer, saved: Optional[train_state.Saved]):
    """Schedule position, best validation loss, epoch sums and every RNG stream: from the checkpoint, or seeded."""
    args, rank, world_size = run.args, dist.get_rank(), dist.get_world_size()
    t.iters_rng = random.Random(args.seed)
    if not saved:
        training.seed_everything(args.seed, rank, world_size)
        return
    res, start_ep, start_it = saved.resume, saved.epoch, saved.it
    if start_it and res.get('glb_batch_size', args.glb_batch_size) != args.glb_batch_size:
        start_it = start_it * int(res['glb_batch_size']) // args.glb_batch_size
        run.log.info(f'[resume] the global batch changed ({res["glb_batch_size"]} -> {args.glb_batch_size}): the epoch '
                     f'continues at iteration {start_it} (an approximate, not an exact, resume)')
    if start_it >= t.iters_train:
        start_ep, start_it = start_ep + 1, 0
    t.start_ep, t.start_it = start_ep, start_it
    t.last_save_g_it = start_ep * t.iters_train + start_it
    t.best_val_tail = float(res.get('best_val_tail', t.best_val_tail))
    t.nonfinite_in_a_row = int(res.get('nonfinite_in_a_row', 0))
    if not training.restore_rank_states(run, res, t.ep_sums, mid_epoch=start_it > 0):
        run.log.info(f'[resume] the checkpoint was written by {res.get("world_size", "?")} processes, this run has '
                     f'{world_size}: random streams are re-seeded (an approximate, not an exact, resume)')
        training.seed_everything(args.seed, rank, world_size, offset=start_ep * t.iters_train + start_it)
    if 'iters_rng' in res:
        t.iters_rng.setstate(training.tensors_to_random(res['iters_rng'], res['iters_rng_gauss']))
    if start_ep < args.ep:
        run.log.info(f'[resume] from {run.path("ar-ckpt-last.pth")}: epoch {start_ep + 1}/{args.ep}, iteration '
                     f'{start_it + 1}/{t.iters_train}')
    if dist.is_master() and start_ep + start_it > 0:
        training.truncate_log(run.path('log.txt'), start_ep)


def save_checkpoint(run: Run, t: Trainer, ep: int, it: int, improved: bool = False):
    """Collective: every rank contributes its RNG state, epoch sums and parameter fingerprint; local rank 0 writes
    ``ar-ckpt-last.pth`` atomically (and links it to ``ar-ckpt-best.pth`` when ``improved``)."""
    args, last_path = run.args, run.path('ar-ckpt-last.pth')
    t0, g_it = time.time(), ep * t.iters_train + it
    fps = training.gather_tensor(training.param_fingerprint(t.var_wo_ddp))
    if dist.is_master() and not all(torch.equal(fps[0], f) for f in fps[1:]):
        run.log.warning('[save] WARNING: the parameters differ between ranks (DDP out of sync)')
    ranks = training.rank_states(run, t.ep_sums)
    py_t, py_g = training.random_to_tensors(t.iters_rng.getstate())
    var, implicit = t.var_wo_ddp, t.var_wo_ddp.backbone.is_implicit
    if dist.get_local_rank() == 0:
        state = train_state.pack('var', train_state.Saved(
            epoch=ep, it=it, weights={'var_wo_ddp': var.state_dict(), 'vae_local': t.vae.state_dict()},
            optim={'optimizer': t.opt.state_dict(), 'scaler': t.scaler.state_dict() if t.scaler else {},
                   'grad_clip': args.tclip, 'n_gradient_accumulation': args.ac},
            config={'patch_nums': list(args.patch_nums), 'resos': list(args.resos), 'label_smooth': args.ls,
                    'use_implicit': implicit, 'pre_depth': var.pre_depth if implicit else 0,
                    'post_depth': var.post_depth if implicit else 0, 'depth': args.depth,
                    'num_classes': args.num_classes, 'vae_fingerprint': t.vae_id, 'flex': t.feed.flex,
                    'class_names': list(t.class_names)},
            args=config_to_dict(args),
            resume={'g_it': g_it, 'iters_rng': py_t, 'iters_rng_gauss': py_g, 'world_size': dist.get_world_size(),
                    'glb_batch_size': args.glb_batch_size, 'iters_train': t.iters_train,
                    'best_val_tail': t.best_val_tail, 'nonfinite_in_a_row': t.nonfinite_in_a_row,
                    'rank_fingerprints': fps, **ranks}))
        training.write_checkpoint(state, last_path, run.path('ar-ckpt-best.pth') if improved else None)
        del state
    dist.barrier()
    t.last_save_g_it = g_it
    where = f'end of epoch {ep}' if it == 0 else f'epoch {ep + 1}, after iteration {it}/{t.iters_train}'
    run.log.info(f'[save] {where} -> {last_path}{" (+ best)" if improved else ""} ({time.time() - t0:.1f}s)')


# ============================================== one epoch =============================================================
def forward_backward(run: Run, t: Trainer, img, label, step: Step, g_it: int, sync: bool, detail: bool) -> torch.Tensor:
    """Teacher-forcing forward and backward of one iteration over the scales of ``step`` (gradients accumulate over
    ``--ac`` iterations; DDP all-reduces them when ``sync``).  Returns this rank's metrics as a device tensor, read out
    later (no host sync here): loss, L_mean, L_tail, acc_mean, acc_tail (tail: ``step``'s last scale), then with
    ``detail`` the loss and accuracy of each of ``step``'s scales."""
    args, dev, vae = run.args, run.dev, t.vae
    img, label = img.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
    with torch.no_grad():      # the teacher-forcing input from the frozen tokenizer
        gt_idx_Bl, x_BLCv_wo_first_l = t.feed.tokens(vae, img, step.patch_nums)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
    no_sync = t.var.no_sync() if not sync and t.var is not t.var_wo_ddp else contextlib.nullcontext()
    with no_sync:
        with run.autocast():
            logits_BLV = t.feed.logits(t.var, label, x_BLCv_wo_first_l, step)
        logits_BLV = logits_BLV.float()
        V = logits_BLV.shape[-1]
        loss_BL = F.cross_entropy(logits_BLV.view(-1, V), gt_BL.view(-1), label_smoothing=args.ls,
                                  reduction='none').view(gt_BL.shape)
        loss = loss_BL.mean()          # uniform weight 1/L per token, mean over images
        if g_it in run.faults.nonfinite_at:
            loss = loss * float('nan')
        with torch.no_grad():
            ce_BL = loss_BL.detach() if args.ls == 0 else F.cross_entropy(
                logits_BLV.view(-1, V), gt_BL.view(-1), reduction='none').view(gt_BL.shape)
            hit_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float()
        del logits_BLV                 # the (B, L, V) logits are not needed by backward: free them now
        loss_scaled = loss / args.ac
        (t.scaler.scale(loss_scaled) if t.scaler else loss_scaled).backward()
    last_l = step.patch_nums[-1] ** 2
    parts = [loss.detach(), ce_BL.mean(), ce_BL[:, -last_l:].mean(),
             hit_BL.mean() * 100, hit_BL[:, -last_l:].mean() * 100]
    if detail:
        ends = np.cumsum([0] + [pn * pn for pn in step.patch_nums]).tolist()
        parts += [ce_BL[:, bg:ed].mean() for bg, ed in zip(ends, ends[1:])]
        parts += [hit_BL[:, bg:ed].mean() * 100 for bg, ed in zip(ends, ends[1:])]
    return torch.stack(parts)


def train_one_epoch(run: Run, t: Trainer, ep: int, first_it: int, ld_train) -> Pace:
    """Iterations ``first_it..`` of epoch ``ep``, one optimizer step (``--ac`` iterations) at a time: at each step
    boundary the ranks agree whether to stop (SIGTERM / Ctrl-C, an unreadable image: save first) and save every
    ``--ckpt_every_iters``; logging every ``--log_freq`` iterations."""
    args, iters = run.args, t.iters_train
    max_it, wp_it = args.ep * iters, args.wp * iters
    log_freq = args.log_freq or max(1, iters // 10)
    set_to_none = t.var is t.var_wo_ddp         # DDP: keep the gradients as views of its buckets
    params = [p for p in t.var_wo_ddp.parameters() if p.requires_grad]
    batches, pace, grad_norm, it = Batches(ld_train), Pace(), None, first_it
    while it < iters:
        # ---- step boundary: the batches of the next step are read; every rank takes the same branch ----
        window = batches.take(min(args.ac - it % args.ac, iters - it))
        training.step_boundary(run, batches, lambda it=it: save_checkpoint(run, t, ep, it),
                               f'in epoch {ep + 1} after iteration {it}/{iters} ({run.path("ar-ckpt-last.pth")})')
        if it > first_it and args.ckpt_every_iters and ep * iters + it - t.last_save_g_it >= args.ckpt_every_iters:
            save_checkpoint(run, t, ep, it)

        window_sums = torch.zeros(4, dtype=torch.float64, device=run.dev)
        for k, (img, label) in enumerate(window):
            g_it = ep * iters + it
            run.faults.kill(g_it)
            lr, wd = lr_wd_annealing(args.sche, t.opt, args.tlr, args.twd, args.twde, g_it, wp_it, max_it,
                                     wp0=args.wp0, wpe=args.wpe)
            step = t.feed.draw(t.iters_rng)        # the same on every rank: scales (FlexVAR: drawn), VIAR's (n0, n1)
            log_now = it == first_it or (it + 1) % log_freq == 0 or it + 1 == iters
            metrics = forward_backward(run, t, img, label, step, g_it, sync=k == len(window) - 1, detail=log_now)
            window_sums += metrics[1:5].double()
            if k == len(window) - 1:
                gn = training.optimizer_step(t.opt, t.scaler, params, args.tclip, max_scale=2. ** 15,
                                             set_to_none=set_to_none)
                count_step(run, t, ep, it, gn, window_sums, len(window), metrics)
                grad_norm = gn if gn is not None else grad_norm
            pace.tick()
            if log_now:      # console and TensorBoard (a collective: every rank logs the same iterations)
                log_iteration(run, t, ep, it, g_it, dist.allreduce_mean(metrics).tolist(), lr, wd, grad_norm, step,
                              pace)
            it += 1
    return pace


def count_step(run: Run, t: Trainer, ep: int, it: int, grad_norm: Optional[float], window_sums, n: int, metrics):
    """Epoch sums of a step; a non-finite step (skipped by every rank alike) is counted and, ``--max_nonfinite`` in
    a row, ends the run."""
    args = run.args
    if grad_norm is not None:
        t.ep_sums.add('L_mean', window_sums)
        t.ep_sums.inc(iters=n, grad_norm=grad_norm, steps=1)
        t.nonfinite_in_a_row = 0
        return
    t.ep_sums.inc(skipped=n)
    t.nonfinite_in_a_row += 1
    run.log.info(f'[ep {ep + 1}/{args.ep} it {it + 1}/{t.iters_train}] non-finite loss or gradient (loss='
                 f'{metrics[0].item()}): step skipped ({t.nonfinite_in_a_row} in a row)')
    if run.tb is not None:
        run.tb.add_scalar('AR_opt_grad/nonfinite_skipped', 1.0, ep * t.iters_train + it)
    if t.nonfinite_in_a_row >= args.max_nonfinite:
        last = run.path('ar-ckpt-last.pth')
        saved = f'{last} holds the model of the last save' if os.path.isfile(last) else 'no checkpoint was saved yet'
        raise UserError(f'{t.nonfinite_in_a_row} {"iterations" if args.ac == 1 else "optimizer steps"} in a row had a '
                        f'non-finite loss or gradient (last: epoch {ep + 1}, iteration {it + 1}); training stopped '
                        f'({saved}): lower --tblr, lower --tclip or use --fp16=2 (bf16), then rerun')


def log_iteration(run: Run, t: Trainer, ep: int, it: int, g_it: int, values: List[float], lr: float, wd: float,
                  grad_norm: Optional[float], step: Step, pace: Pace):
    """One line on the console, the iteration's scalars in TensorBoard (per scale: ``step``'s scales, tagged by their
    resolution; FlexVAR: the schedule's length and tokens under AR_flex/)."""
    args, s, K, n_iters = run.args, Stats(*values[:5]), len(step.patch_nums), step.iters
    resos = [args.data_load_reso // args.patch_nums[-1] * pn for pn in step.patch_nums]
    img_per_s = args.glb_batch_size / max(pace.dt, 1e-9)
    if run.tb is not None:
        run.tb.scalars(g_it, s._asdict(), prefix='AR_iter_loss/')
        run.tb.scalars(g_it, {'AR_opt_lr/lr': lr, 'AR_opt_wd/wd': wd, 'AR_opt_grad/grad_norm': grad_norm,
                              'AR_speed/img_per_s': img_per_s,
                              'AR_opt_grad/scale_log2': math.log2(t.scaler.get_scale()) if t.scaler else None,
                              **({'AR_implicit/n0_no_grad': n_iters[0], 'AR_implicit/n1_with_grad': n_iters[1]}
                                 if n_iters else {}),
                              **({'AR_flex/scales': K, 'AR_flex/tokens': sum(pn * pn for pn in step.patch_nums),
                                  'AR_flex/last_pn': step.patch_nums[-1]} if t.feed.flex else {})})
        run.tb.scalars(g_it, {f'L_{r}': v for r, v in zip(resos, values[5:5 + K])}, prefix='AR_iter_scale/')
        run.tb.scalars(g_it, {f'acc_{r}': v for r, v in zip(resos, values[5 + K:])}, prefix='AR_iter_scale/')
        run.tb.flush()
    gn_txt = f'{grad_norm:.3f}' if grad_norm is not None else '-'
    eta = pace.left(args.ep * t.iters_train - g_it - 1)
    run.log.info(f'[ep {ep + 1:3d}/{args.ep}] [{it + 1:5d}/{t.iters_train}]  eta {eta}  '
                 f'Lm {s.L_mean:.4f}  Lt {s.L_tail:.4f}  Accm {s.acc_mean:.2f}  Acct {s.acc_tail:.2f}  lr {lr:.3e}  '
                 f'wd {wd:.3g}  tnm {gn_txt}  {img_per_s:.1f} img/s'
                 + (f'  n0/n1 {n_iters[0]}/{n_iters[1]}' if n_iters else '')
                 + (f'  pn {"_".join(map(str, step.patch_nums))}' if t.feed.flex else ''))


# ============================================== end of an epoch: logs, validation, checkpoint =========================
@torch.no_grad()
def evaluate(run: Run, t: Trainer, ld_val) -> Tuple[Optional[dict], Optional[str]]:
    """Validation on the scales of ``--pn`` (eval mode; VIAR with its eval iteration count) -> (metrics, None), or
    (None, why) when an image was unreadable on some rank.  Runs on a forked RNG with a fixed seed: deterministic, and
    training's RNG stream is untouched."""
    var, vae, dev = t.var_wo_ddp, t.vae, run.dev
    step = Step(t.feed.patch_nums, None)        # --pn; VIAR: the eval-mode iteration count
    last_l = step.patch_nums[-1] ** 2

    def batch_sums(batch):
        img, label = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        gt_idx_Bl, x_BLCv = t.feed.tokens(vae, img, step.patch_nums)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        with run.autocast():
            logits_BLV = t.feed.logits(var, label, x_BLCv, step).float()
        ce_BL = F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.view(-1), reduction='none').view(gt_BL.shape)
        hit_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float()
        B = gt_BL.shape[0]
        return torch.cat([torch.stack([ce_BL.mean(), ce_BL[:, -last_l:].mean(), hit_BL.mean() * 100,
                                       hit_BL[:, -last_l:].mean() * 100]).double() * B,
                          torch.tensor([float(B)], dtype=torch.float64, device=dev)])

    var.eval()
    sums, bad = training.eval_sums(run, ld_val, batch_sums, seed=run.args.seed)
    var.train()
    if sums is None:
        return None, bad
    n = sums[4].item()      # the ratios below do not depend on the division by the world size
    vL_mean, vL_tail, vacc_mean, vacc_tail = (sums[:4] / max(n, 1e-12)).tolist()
    return {'vL_mean': vL_mean, 'vL_tail': vL_tail, 'vacc_mean': vacc_mean, 'vacc_tail': vacc_tail,
            'best_vL_tail': min(t.best_val_tail, vL_tail), 'n': round(n * dist.get_world_size())}, None


def end_of_epoch(run: Run, t: Trainer, ep: int, ld_val, pace: Pace, t_start: float):
    """Epoch metrics to log.txt / TensorBoard / console; validation and checkpoint every ``--save_freq`` epochs,
    at the end, on ``--ckpt_every_iters`` and on preemption."""
    args, last_path = run.args, run.path('ar-ckpt-last.pth')
    g_end, max_it = (ep + 1) * t.iters_train, args.ep * t.iters_train
    stop_now, = training.agree(run.dev, run.stop.signame)
    s = t.ep_sums.mean_over_ranks()
    n_ok = max(s['iters'], 1)
    record = {'kind': 'epoch', 'ep': ep + 1, 'eps': args.ep, 'it': g_end,
              **{k: s[k] / n_ok for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail')},
              'lr': t.opt.param_groups[0]['lr'], 'wd': max(g['weight_decay'] for g in t.opt.param_groups),
              'grad_norm': s['grad_norm'] / max(s['steps'], 1), 'skipped': int(s['skipped']),
              'remain_time': str(pace.left(max_it - g_end)), 'elapsed_s': round(time.time() - t_start, 1)}
    if run.tb is not None:
        run.tb.scalars(ep + 1, {k: record[k] for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail')},
                       prefix='AR_ep_loss/')
    if args.skip_bad_images:
        training.report_bad_images(run, t.datasets)
    is_save_ep = (ep + 1) % args.save_freq == 0 or ep + 1 == args.ep
    improved = False
    if is_save_ep:
        t0 = time.time()
        val, bad = evaluate(run, t, ld_val)
        if val is None:
            if dist.is_master():
                training.append_json_line(run.path('log.txt'), record)
            t.ep_sums.zero_()
            save_checkpoint(run, t, ep + 1, 0)
            raise training.data_error(bad, f'validation of epoch {ep + 1}; checkpoint saved at the end of the epoch')
        improved = val['vL_tail'] < t.best_val_tail
        t.best_val_tail = min(t.best_val_tail, val['vL_tail'])
        if dist.is_master():
            training.append_json_line(run.path('log.txt'), {'kind': 'val', 'ep': ep + 1, **val})
        if run.tb is not None:
            run.tb.scalars(ep + 1, {k: val[k] for k in ('vL_mean', 'vL_tail', 'vacc_mean', 'vacc_tail')},
                           prefix='AR_val/')
        run.log.info(f' [*] [ep {ep + 1}] (val {val["n"]})  Lm {val["vL_mean"]:.4f}  Lt {val["vL_tail"]:.4f}  Accm '
                     f'{val["vacc_mean"]:.2f}  Acct {val["vacc_tail"]:.2f}  best Lt {t.best_val_tail:.4f}  '
                     f'({time.time() - t0:.1f}s)')
    if dist.is_master():
        training.append_json_line(run.path('log.txt'), record)
    run.log.info(f'     [ep {ep + 1}] (train) Lm {record["L_mean"]:.4f}  Lt {record["L_tail"]:.4f}  Accm '
                 f'{record["acc_mean"]:.2f}  Acct {record["acc_tail"]:.2f}  remain {record["remain_time"]}')
    if run.tb is not None:
        run.tb.flush()
    periodic = args.ckpt_every_iters and g_end - t.last_save_g_it >= args.ckpt_every_iters
    if is_save_ep or stop_now or periodic:
        t.ep_sums.zero_()
        save_checkpoint(run, t, ep + 1, 0, improved=improved)
    if stop_now:
        raise run.stopped(f'at the end of epoch {ep + 1} ({last_path})')


def main(argv=None) -> int:
    """``python train.py ARGV``: trains (``train``); the exit status (0 done, 1 after one error line, 143 stopped by
    a signal after saving)."""
    return training.cli(train, parse_args, argv, prog='train.py', oom_hint=lambda args: (
        f'lower --bs, raise --ac (the same global batch in more, smaller steps) or add --grad_ckpt (per-rank batch '
        f'{getattr(args, "batch_size", "?")} images)'))


if __name__ == '__main__':
    raise SystemExit(main())
