"""Trains VAR, or VIAR with ``--use_implicit``, on an ImageNet-style folder with a frozen VQVAE tokenizer.

    torchrun --nproc_per_node=8 train.py --data_path=/path/to/imagenet-1k --depth=30 --bs=512 --ep=550 \
        --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08 --use_implicit=True --p_depth=5

One process per GPU under ``torchrun`` (NCCL; gloo on CPU), or a plain ``python train.py ...`` (one process).
Teacher forcing: the tokenizer turns each image into its multi-scale token maps ``gt_idx_Bl``; the transformer
predicts every token from the class and the earlier scales; the loss is the cross-entropy averaged uniformly
over the L tokens.  VIAR trains its implicit block with Jacobian-free backprop: (n0, n1) fixed-point steps
without / with gradient, drawn per iteration from one seeded generator shared by all ranks (every rank runs the
same counts: no rank waits for a slower one, and the draw is part of the checkpoint).

Outputs in ``--local_out_dir_path``: stdout.txt / stderr.txt, log.txt (one JSON line per epoch and per
validation), TensorBoard ``tb-VARd{depth}__pn...``, ar-ckpt-last.pth and ar-ckpt-best.pth (best validation tail
loss).  Rerunning the same command resumes exactly from ar-ckpt-last.pth (model, optimizer, GradScaler, schedule
position, data order, RNG states); SIGTERM / Ctrl-C save a checkpoint first.
"""
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models import build_var
from models.checkpoint import CheckpointError, load_vae, read_checkpoint, tokenizer_downsample
from utils import dist
from utils.arg_util import args_to_dict, finalize_args, parse_args
from utils.data import DataError, ResumableBatchSampler, ShardSampler, build_dataset
from utils.download import hf_url
from utils.lr_control import check_schedule, lr_wd_annealing, param_groups
from utils.misc import atomic_write_bytes, save_atomic
from utils.run_log import EXIT_PREEMPTED, Preempted, StopFlag, TBWriter, UserError

VAE_HINT = (f'download it from {hf_url("vae_ch160v4096z32.pth")} and place it in ckpts/ (or pass --vae_ckpt '
            f'/path/to/it)')
# flags that fix the architecture: a resumed run must use the checkpoint's values
ARCH_FLAGS = ('depth', 'use_implicit', 'p_depth', 'pn', 'saln', 'anorm', 'num_classes')


_TRAINING = False      # set once the training loop starts



# ============================================== console and logs ======================================================
class Tee:
    """Writes to the console stream and to a file (rank 0's stdout.txt / stderr.txt)."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, 'a', encoding='utf-8')

    def write(self, s):
        self.stream.write(s)
        self.file.write(s)
        if '\n' in s:
            self.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def close(self):
        self.file.close()

    def isatty(self):
        return False

    def fileno(self):
        return self.stream.fileno()

    @property
    def encoding(self):
        return self.stream.encoding


def setup_output(out_dir: str, master: bool):
    if master:
        sys.stdout = Tee(sys.stdout, os.path.join(out_dir, 'stdout.txt'))
        sys.stderr = Tee(sys.stderr, os.path.join(out_dir, 'stderr.txt'))
    else:   # non-zero ranks print nothing (their errors still reach stderr)
        sys.stdout = open(os.devnull, 'w')
        warnings.filterwarnings('ignore')


def append_json_line(path: str, record: dict):
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def truncate_log(path: str, epoch: int):
    """On resume: drop log.txt lines of epochs after the checkpoint (they are trained and logged again)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                if json.loads(line).get('ep', 0) <= epoch:
                    keep.append(line)
            except ValueError:
                pass
    atomic_write_bytes(''.join(keep).encode('utf-8'), path)


# ============================================== RNG states (as tensors) ===============================================
def seed_rank(seed: int, rank: int, world_size: int, offset: int = 0):
    s = (seed * world_size + rank + offset * 7919) % (2 ** 63)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


def py_random_state_to_tensor(state) -> torch.Tensor:
    version, internal, gauss = state
    return torch.tensor([version, *internal, 0 if gauss is None else 1], dtype=torch.int64), \
        torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)


def tensor_to_py_random_state(t: torch.Tensor, gauss: torch.Tensor):
    v = t.tolist()
    return v[0], tuple(v[1:-1]), (gauss.item() if v[-1] else None)


def get_rng_state(dev: torch.device) -> dict:
    py_t, py_g = py_random_state_to_tensor(random.getstate())
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(dev) if dev.type == 'cuda' else torch.zeros(0, dtype=torch.uint8),
            'python': py_t, 'python_gauss': py_g,
            'numpy': torch.from_numpy(keys.astype(np.int64)),
            'numpy_extra': torch.tensor([pos, has_gauss, cached], dtype=torch.float64)}


def set_rng_state(state: dict, dev: torch.device):
    torch.set_rng_state(state['torch'])
    if dev.type == 'cuda' and state['cuda'].numel():
        torch.cuda.set_rng_state(state['cuda'], dev)
    random.setstate(tensor_to_py_random_state(state['python'], state['python_gauss']))
    pos, has_gauss, cached = state['numpy_extra'].tolist()
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))


# ============================================== metrics ===============================================================
@torch.no_grad()
def token_metrics(ce_BL: torch.Tensor, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, last_l: int) -> torch.Tensor:
    """[mean CE, tail CE (last scale), mean acc %, tail acc %] of a batch."""
    hit_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float()
    return torch.stack([ce_BL.mean(), ce_BL[:, -last_l:].mean(), hit_BL.mean() * 100, hit_BL[:, -last_l:].mean() * 100])


@torch.no_grad()
def per_scale_metrics(ce_BL, logits_BLV, gt_BL, begin_ends, resos) -> dict:
    hit_BL = (logits_BLV.argmax(dim=-1) == gt_BL).float()
    out = {}
    for (bg, ed), reso in zip(begin_ends, resos):
        out[f'L_{reso}'] = ce_BL[:, bg:ed].mean().item()
        out[f'acc_{reso}'] = hit_BL[:, bg:ed].mean().item() * 100
    return out


@torch.no_grad()
def evaluate(var_wo_ddp, vae, ld_val, dev, amp_ctx, seed: int):
    """Validation (eval mode; VIAR with its eval iteration count) -> (L_mean, L_tail, acc_mean, acc_tail, n).
    Runs on a forked RNG with a fixed seed: deterministic, and training's RNG stream is untouched."""
    training = var_wo_ddp.training
    var_wo_ddp.eval()
    last_l = var_wo_ddp.patch_nums[-1] ** 2
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == 'cuda' else []
    with torch.random.fork_rng(devices=fork_devices, device_type=dev.type if dev.type == 'cuda' else 'cuda'):
        torch.manual_seed(seed)
        for img, label in ld_val:
            img, label = img.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
            gt_idx_Bl = vae.img_to_idxBl(img)
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
            x_BLCv = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
            with amp_ctx():
                logits_BLV = var_wo_ddp(label, x_BLCv)
            logits_BLV = logits_BLV.float()
            ce_BL = F.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]), gt_BL.view(-1), reduction='none').view(gt_BL.shape)
            B = gt_BL.shape[0]
            sums[:4] += token_metrics(ce_BL, logits_BLV, gt_BL, last_l).double() * B
            sums[4] += B
    var_wo_ddp.train(training)
    dist.allreduce_mean(sums)           # the ratios below do not depend on the division by the world size
    n = sums[4].item()
    vals = (sums[:4] / max(n, 1e-12)).tolist()
    return (*vals, round(n * dist.get_world_size()))


# ============================================== checkpoints ===========================================================
@torch.no_grad()
def param_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Per-parameter (sum, sum of squares) in float64: equal on all ranks iff DDP kept them in sync."""
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]).flatten()


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    if not dist.initialized():
        return t.unsqueeze(0).cpu()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    tdist.all_gather(out, t)
    return torch.stack(out).cpu()


def gather_object(obj) -> list:
    if not dist.initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def load_training_checkpoint(path: str) -> dict:
    ckpt = read_checkpoint(path, 'training checkpoint')
    ok = isinstance(ckpt, dict) and isinstance(ckpt.get('trainer'), dict) and 'var_wo_ddp' in ckpt['trainer'] \
        and 'var_opt' in ckpt['trainer'] and isinstance(ckpt.get('args'), dict) and 'epoch' in ckpt
    if not ok:
        raise CheckpointError(f'{path!r} is not a training checkpoint written by train.py; move it away (or pass '
                              f'another --local_out_dir_path) to start a new run')
    return ckpt


def check_resume_compat(saved: dict, args, path: str):
    for k in ARCH_FLAGS:
        if k == 'p_depth' and not args.use_implicit:
            continue
        if k in saved and saved[k] != getattr(args, k):
            raise CheckpointError(
                f'{path!r} was written by a run with --{k} {saved[k]}, but this command gives --{k} {getattr(args, k)}: '
                f'rerun with the same flags to resume it, or pass another --local_out_dir_path to start a new run')


# ============================================== training ==============================================================
@dataclass
class Run:
    """Everything one training run holds: the models and optimizer, and the progress a checkpoint must restore."""
    args: Any
    dev: torch.device
    amp_dtype: Optional[torch.dtype]
    stop: 'StopFlag'
    vae: Any = None
    var_wo_ddp: Any = None
    var: Any = None                     # var_wo_ddp, or its DDP wrapper
    opt: Any = None
    scaler: Any = None
    iters_train: int = 0
    iters_rng: random.Random = None     # VIAR (n0, n1): the same draws on every rank
    start_ep: int = 0
    start_it: int = 0
    best_val_tail: float = float('inf')
    nonfinite_in_a_row: int = 0
    # epoch sums: L_mean, L_tail, acc_mean, acc_tail, iterations, skipped, grad-norm sum, optimizer steps
    ep_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(8, dtype=torch.float64))
    last_save_g_it: int = 0
    last_lr_wd: tuple = (0.0, 0.0)     # lr and wd of the epoch's last iteration, for log.txt
    tb: Optional['TBWriter'] = None

    @property
    def last_path(self):
        return os.path.join(self.args.local_out_dir_path, 'ar-ckpt-last.pth')

    @property
    def best_path(self):
        return os.path.join(self.args.local_out_dir_path, 'ar-ckpt-best.pth')

    def amp_ctx(self):
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def tb_log(self, step, **scalars):
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)


def main(args):
    """Trains until ``--ep`` epochs are done, resuming from ``ar-ckpt-last.pth`` when the output folder has one."""
    run = setup(args)
    ckpt = find_checkpoint(run)
    train_set, val_set = build_data(args, ckpt, run.last_path)
    build_models(run, ckpt)
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, dist.get_rank(), dist.get_world_size(),
                                    seed=args.seed)
    run.iters_train = sampler.iters_per_epoch
    restore_progress(run, ckpt)
    del ckpt
    pin, rank = run.dev.type == 'cuda', dist.get_rank()
    ld_train = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=pin,
                          persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed + rank))
    ld_val = DataLoader(val_set, batch_size=max(1, round(args.batch_size * 1.5)), num_workers=args.workers,
                        sampler=ShardSampler(len(val_set), rank, dist.get_world_size()), pin_memory=pin,
                        generator=torch.Generator().manual_seed(args.seed + rank))
    if run.start_ep >= args.ep:
        print(f'[train] nothing to do: {run.last_path} already holds {run.start_ep} epochs (--ep {args.ep}); raise '
              f'--ep to train longer')
        return
    if dist.is_master():
        run.tb = TBWriter(os.path.join(args.local_out_dir_path, args.tb_name),
                          purge_step=run.start_ep * run.iters_train + run.start_it)
    global _TRAINING
    _TRAINING = True
    t_start = time.time()
    for ep in range(run.start_ep, args.ep):
        first_it = run.start_it if ep == run.start_ep else 0
        if first_it == 0:
            run.ep_sums.zero_()
        sampler.set_epoch(ep, first_it)
        stop_now, dt_it = train_one_epoch(run, ep, first_it, ld_train)
        end_of_epoch(run, ep, ld_val, stop_now, dt_it, t_start)
    print(f'[train] finished {args.ep} epochs in {timedelta(seconds=int(time.time() - t_start))}; best validation '
          f'tail loss {run.best_val_tail:.4f}; checkpoints in {args.local_out_dir_path}')
    if run.tb is not None:
        run.tb.close()


def setup(args) -> Run:
    """Processes, output folder (stdout/stderr tee'd on rank 0), signal handlers, precision."""
    dev = dist.init_distributed(args.device)
    try:
        finalize_args(args, dist.get_world_size(), downsample=tokenizer_downsample(args.vae_ckpt))
        check_schedule(args.sche)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        os.makedirs(args.local_out_dir_path, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --local_out_dir_path {args.local_out_dir_path!r}: {e.strerror}') from None
    setup_output(args.local_out_dir_path, dist.is_master())
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    amp_dtype = {0: None, 1: torch.float16, 2: torch.bfloat16}[args.fp16]
    if amp_dtype is torch.float16 and dev.type != 'cuda':
        print('[train] --fp16=1 (float16 + GradScaler) needs CUDA; on CPU training runs in bfloat16 autocast instead')
        amp_dtype = torch.bfloat16
    print(f'[train] {" ".join(sys.argv)}')
    print(f'[train] world size {dist.get_world_size()}, device {dev}, per-rank batch {args.batch_size}, global batch '
          f'{args.glb_batch_size} x ac {args.ac} = {args.glb_batch_size * args.ac}, lr {args.tlr:.3g}')
    return Run(args=args, dev=dev, amp_dtype=amp_dtype, stop=stop)


def find_checkpoint(run: Run) -> Optional[dict]:
    """The output folder's ``ar-ckpt-last.pth`` (None for a new run), the same on every rank; fixes ``--seed``."""
    args, last_path = run.args, run.last_path
    try:
        ckpt = load_training_checkpoint(last_path) if os.path.isfile(last_path) else None
    except CheckpointError as e:
        raise CheckpointError(f'cannot resume: {e}. Checkpoints are written atomically, so the file was damaged '
                              f'afterwards: restore it, copy ar-ckpt-best.pth over it, or move it away to start over') from None
    where = gather_object(None if ckpt is None else (ckpt['epoch'], ckpt['iter']))
    if any(w != where[0] for w in where):
        raise UserError(f'the ranks see different checkpoints in {args.local_out_dir_path!r} ({where}): on several '
                        f'nodes, give every node the same --local_out_dir_path content (a shared filesystem)')
    if args.seed is None:
        saved_seed = ckpt['args'].get('seed') if ckpt else None
        args.seed = saved_seed if saved_seed is not None else dist.broadcast_object(random.SystemRandom().randrange(2 ** 31))
    elif ckpt and ckpt['args'].get('seed') not in (None, args.seed):
        print(f'[train] note: the checkpoint was trained with --seed {ckpt["args"]["seed"]}, continuing with --seed '
              f'{args.seed} (data order and randomness change from here)')
    return ckpt


def build_data(args, ckpt: Optional[dict], last_path: str):
    """Train and val ImageFolder datasets at ``args.data_load_reso`` (the tokenizer's downsampling x the last scale),
    checked before any model is built; sets ``--num_classes``."""
    classes, train_set, val_set = build_dataset(args.data_path, args.data_load_reso, hflip=args.hflip, mid_reso=args.mid_reso)
    if args.num_classes == 0:
        args.num_classes = len(classes)
    elif args.num_classes < len(classes):
        raise UserError(f'--num_classes {args.num_classes} is smaller than the {len(classes)} class folders in '
                        f'{os.path.join(args.data_path, "train")!r}: leave it out or raise it')
    if len(val_set) == 0:
        raise DataError(f'{os.path.join(args.data_path, "val")!r} holds no images')
    print(f'[data] {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, {args.data_load_reso} px')
    if ckpt:
        check_resume_compat(ckpt['args'], args, last_path)
    return train_set, val_set


def build_models(run: Run, ckpt: Optional[dict]):
    """Frozen tokenizer, transformer (same init on every rank, or the checkpoint's weights), DDP, AdamW (betas
    0.9/0.95, no decay on 1-D tensors and embeddings) and the fp16 GradScaler."""
    args, dev, last_path = run.args, run.dev, run.last_path
    vae = load_vae(args.vae_ckpt, dev, patch_nums=tuple(args.patch_nums), hint=VAE_HINT)
    torch.manual_seed(args.seed)
    var_wo_ddp = build_var(
        vae, device=dev, patch_nums=tuple(args.patch_nums), num_classes=args.num_classes, depth=args.depth,
        shared_aln=args.saln, attn_l2_norm=args.anorm, flash_if_available=args.fuse, init_adaln=args.aln,
        init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
        use_implicit=args.use_implicit, pre_depth=args.p_depth, post_depth=args.p_depth)
    var_wo_ddp.train()
    if ckpt:
        try:
            var_wo_ddp.load_state_dict(ckpt['trainer']['var_wo_ddp'], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'{last_path!r} does not fit the model of this command ({str(e).splitlines()[0]}); '
                                  f'pass another --local_out_dir_path to start a new run') from None
    n_params = sum(p.numel() for p in var_wo_ddp.parameters())
    print(f'[model] {var_wo_ddp.extra_repr()}: {n_params / 1e6:.2f}M parameters; tokenizer V={vae.vocab_size} '
          f'Cvae={vae.Cvae} from {args.vae_ckpt}')
    var = var_wo_ddp
    if dist.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        import inspect       # the buffers (masks, level ids) are constants: no need to re-broadcast them every step
        no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                          else {'broadcast_buffers': False})
        var = DDP(var_wo_ddp, device_ids=[dev.index] if dev.type == 'cuda' else None, find_unused_parameters=False,
                  **no_buffer_sync)

    _, groups = param_groups(var_wo_ddp)
    opt = torch.optim.AdamW(groups, lr=args.tlr, weight_decay=0, betas=(0.9, 0.95),
                            fused=True if dev.type == 'cuda' else None)
    scaler = (torch.amp.GradScaler('cuda', init_scale=2. ** 11, growth_interval=1000)
              if run.amp_dtype is torch.float16 else None)
    if ckpt:
        try:
            opt.load_state_dict(ckpt['trainer']['var_opt']['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f'the optimizer state in {last_path!r} does not fit this model ({e}); pass another '
                                  f'--local_out_dir_path to start a new run') from None
        if scaler is not None and ckpt['trainer']['var_opt'].get('scaler'):
            scaler.load_state_dict(ckpt['trainer']['var_opt']['scaler'])
    run.vae, run.var_wo_ddp, run.var, run.opt, run.scaler = vae, var_wo_ddp, var, opt, scaler


def restore_progress(run: Run, ckpt: Optional[dict]):
    """Schedule position, best validation loss, epoch sums and every RNG stream: from the checkpoint, or seeded."""
    args, rank, world_size = run.args, dist.get_rank(), dist.get_world_size()
    run.iters_rng = random.Random(args.seed)
    if not ckpt:
        seed_rank(args.seed, rank, world_size)
        return
    res = ckpt.get('resume', {})
    start_ep, start_it = int(ckpt['epoch']), int(ckpt['iter'])
    if start_it and res.get('glb_batch_size', args.glb_batch_size) != args.glb_batch_size:
        start_it = start_it * int(res['glb_batch_size']) // args.glb_batch_size
        print(f'[resume] the global batch changed ({res["glb_batch_size"]} -> {args.glb_batch_size}): the epoch '
              f'continues at iteration {start_it} (an approximate, not an exact, resume)')
    if start_it >= run.iters_train:
        start_ep, start_it = start_ep + 1, 0
    run.start_ep, run.start_it = start_ep, start_it
    run.last_save_g_it = start_ep * run.iters_train + start_it
    run.best_val_tail = float(res.get('best_val_tail', run.best_val_tail))
    run.nonfinite_in_a_row = int(res.get('nonfinite_in_a_row', 0))
    if start_it and 'ep_sums' in res:
        run.ep_sums = res['ep_sums'].clone().double()
    rngs = res.get('rng')
    if rngs is not None and len(rngs) == world_size:
        set_rng_state(rngs[rank], run.dev)
    else:
        print(f'[resume] the checkpoint was written by {len(rngs or [])} processes, this run has {world_size}: '
              f'random streams are re-seeded (an approximate, not an exact, resume)')
        seed_rank(args.seed, rank, world_size, offset=start_ep * run.iters_train + start_it)
    if 'iters_rng' in res:
        run.iters_rng.setstate(tensor_to_py_random_state(res['iters_rng'], res['iters_rng_gauss']))
    if start_ep < args.ep:
        print(f'[resume] from {run.last_path}: epoch {start_ep + 1}/{args.ep}, iteration {start_it + 1}/{run.iters_train}')
    if dist.is_master() and start_ep + start_it > 0:
        truncate_log(os.path.join(args.local_out_dir_path, 'log.txt'), start_ep)


def save_checkpoint(run: Run, ep: int, it: int, g_it: int, improved: bool = False):
    """Collective: every rank contributes its RNG state and parameter fingerprint; local rank 0 writes
    ``ar-ckpt-last.pth`` atomically (and links it to ``ar-ckpt-best.pth`` when ``improved``)."""
    args, last_path, best_path = run.args, run.last_path, run.best_path
    t0 = time.time()
    fps = gather_tensor(param_fingerprint(run.var_wo_ddp))
    if dist.is_master() and not all(torch.equal(fps[0], f) for f in fps[1:]):
        print('[save] WARNING: the parameters differ between ranks (DDP out of sync)', file=sys.stderr)
    py_t, py_g = py_random_state_to_tensor(run.iters_rng.getstate())
    rngs = gather_object(get_rng_state(run.dev))
    if dist.get_local_rank() == 0:
        state = {
            'epoch': ep, 'iter': it,
            'trainer': {
                'var_wo_ddp': run.var_wo_ddp.state_dict(), 'vae_local': run.vae.state_dict(),
                'var_opt': {'optimizer': run.opt.state_dict(), 'scaler': run.scaler.state_dict() if run.scaler else {},
                            'grad_clip': args.tclip, 'n_gradient_accumulation': args.ac},
                'config': {'patch_nums': list(args.patch_nums), 'resos': list(args.resos),
                           'label_smooth': args.ls, 'use_implicit': bool(args.use_implicit),
                           'pre_depth': args.p_depth if args.use_implicit else 0,
                           'post_depth': args.p_depth if args.use_implicit else 0,
                           'depth': args.depth, 'num_classes': args.num_classes},
            },
            'args': args_to_dict(args),
            'resume': {'g_it': g_it, 'rng': rngs, 'iters_rng': py_t, 'iters_rng_gauss': py_g,
                       'world_size': dist.get_world_size(), 'glb_batch_size': args.glb_batch_size,
                       'iters_train': run.iters_train, 'best_val_tail': run.best_val_tail,
                       'nonfinite_in_a_row': run.nonfinite_in_a_row, 'ep_sums': run.ep_sums.clone(),
                       'rank_fingerprints': fps},
        }
        try:
            save_atomic(state, last_path)
            if improved:
                tmp = best_path + '.tmp'
                if os.path.exists(tmp):
                    os.unlink(tmp)
                try:
                    os.link(last_path, tmp)          # same bytes, no copy; the next save replaces last, not best
                    os.replace(tmp, best_path)
                except OSError:
                    save_atomic(state, best_path)
        except OSError as e:
            raise UserError(f'could not write {last_path!r} ({e.strerror or e}): free disk space and rerun the '
                            f'same command (it resumes from the previous checkpoint)') from None
        del state
    dist.barrier()
    run.last_save_g_it = g_it
    where = f'end of epoch {ep}' if it == 0 else f'epoch {ep + 1}, after iteration {it}/{run.iters_train}'
    print(f'[save] {where} -> {last_path}{" (+ best)" if improved else ""} ({time.time() - t0:.1f}s)')


def train_step(run: Run, img, label, iters, window_bad: bool, stepping: bool, g_it: int):
    """Forward and backward of one iteration (gradients accumulate over ``--ac`` iterations), and the optimizer
    step when ``stepping``.  Returns (stats averaged over ranks: [loss, L_mean, L_tail, acc_mean, acc_tail,
    stop signal], per-token CE and logits for the per-scale log, whether the accumulation window saw a non-finite
    value, whether this iteration was non-finite, whether the optimizer stepped, the grad norm or None)."""
    args, dev, vae = run.args, run.dev, run.vae
    V, L = vae.vocab_size, run.var_wo_ddp.L
    img, label = img.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
    with torch.no_grad():      # teacher forcing input from the frozen tokenizer
        gt_idx_Bl = vae.img_to_idxBl(img)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        x_BLCv_wo_first_l = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
    B = gt_BL.shape[0]
    no_sync = run.var.no_sync() if (dist.get_world_size() > 1 and not stepping) else contextlib.nullcontext()
    with no_sync:
        with run.amp_ctx():
            logits_BLV = run.var(label, x_BLCv_wo_first_l, **({'iters': iters} if iters else {}))
        logits_BLV = logits_BLV.float()
        loss_BL = F.cross_entropy(logits_BLV.view(-1, V), gt_BL.view(-1), label_smoothing=args.ls,
                                  reduction='none').view(B, L)
        loss = loss_BL.mean()          # uniform weight 1/L per token, mean over images
        if g_it in args.debug_nonfinite_at:
            loss = loss * float('nan')
        with torch.no_grad():
            ce_BL = loss_BL.detach() if args.ls == 0 else F.cross_entropy(
                logits_BLV.view(-1, V), gt_BL.view(-1), reduction='none').view(B, L)
            stats = torch.cat([loss.detach().view(1), token_metrics(ce_BL, logits_BLV, gt_BL, args.patch_nums[-1] ** 2),
                               torch.tensor([1.0 if run.stop.signame else 0.0], device=dev)])
            stats = dist.allreduce_mean(stats).tolist()      # one small all-reduce: all ranks agree below
        bad = not math.isfinite(stats[0])
        window_bad = window_bad or bad
        if not window_bad:
            loss_scaled = loss / args.ac
            (run.scaler.scale(loss_scaled) if run.scaler else loss_scaled).backward()

    stepped, grad_norm = False, None
    if stepping:
        opt, scaler = run.opt, run.scaler
        if not window_bad:
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for p in run.var_wo_ddp.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.tclip if args.tclip > 0 else float('inf')).item()
            if scaler is not None:
                scaler.step(opt)        # skipped by the scaler itself on inf/nan fp16 gradients
                scaler.update(new_scale=2. ** 15 if scaler.get_scale() > 2. ** 15 else None)
                stepped = True
            elif math.isfinite(grad_norm):
                opt.step()
                stepped = True
            else:
                bad = True
        opt.zero_grad(set_to_none=True)
        window_bad = False
    return stats, (ce_BL, logits_BLV, gt_BL), window_bad, bad, stepped, grad_norm


def train_one_epoch(run: Run, ep: int, first_it: int, ld_train):
    """Iterations ``first_it..`` of epoch ``ep``, with logging, mid-epoch checkpoints and preemption; returns
    (stop requested, smoothed seconds per iteration)."""
    args, var_wo_ddp, iters_train = run.args, run.var_wo_ddp, run.iters_train
    max_it, wp_it = args.ep * iters_train, args.wp * iters_train
    log_freq = args.log_freq or max(1, iters_train // 10)
    window_bad, stop_now, grad_norm, lr, wd = False, False, None, 0.0, 0.0
    dt_ema, t_last = None, time.time()
    for it, (img, label) in enumerate(ld_train, start=first_it):
        g_it = ep * iters_train + it
        if g_it == args.debug_kill_at_iter:
            os.kill(os.getpid(), getattr(signal, 'SIG' + args.debug_kill_signal))
        lr, wd = lr_wd_annealing(args.sche, run.opt, args.tlr, args.twd, args.twde, g_it, wp_it, max_it,
                                 wp0=args.wp0, wpe=args.wpe)
        stepping = (it + 1) % args.ac == 0 or it + 1 == iters_train
        iters = var_wo_ddp.backbone.draw_iters(run.iters_rng)      # VIAR's (n0, n1); None for VAR
        stats, per_token, window_bad, bad, stepped, gn = train_step(run, img, label, iters, window_bad, stepping, g_it)
        grad_norm = gn if gn is not None else grad_norm
        stop_now = stats[5] > 0
        if bad:
            run.nonfinite_in_a_row += 1
            run.ep_sums[5] += 1
            print(f'[ep {ep + 1}/{args.ep} it {it + 1}/{iters_train}] non-finite loss or gradient '
                  f'(loss={stats[0]}): step skipped ({run.nonfinite_in_a_row} in a row)')
            run.tb_log(g_it, **{'AR_opt_grad/nonfinite_skipped': 1.0})
            if run.nonfinite_in_a_row >= args.max_nonfinite:
                saved = (f'{run.last_path} holds the model of the last save' if os.path.isfile(run.last_path)
                         else 'no checkpoint was saved yet')
                raise UserError(
                    f'{run.nonfinite_in_a_row} iterations in a row had a non-finite loss or gradient (last: epoch '
                    f'{ep + 1}, iteration {it + 1}); training stopped ({saved}): lower --tblr, lower --tclip or use '
                    f'--fp16=2 (bf16), then rerun')
        else:
            run.ep_sums[:4] += torch.tensor(stats[1:5], dtype=torch.float64)
            run.ep_sums[4] += 1
            if stepped:
                run.nonfinite_in_a_row = 0
                run.ep_sums[6] += grad_norm
                run.ep_sums[7] += 1

        # ---- logging: console and TensorBoard every log_freq iterations (and the first / last of an epoch) ----
        now = time.time()
        dt_ema = now - t_last if dt_ema is None else 0.9 * dt_ema + 0.1 * (now - t_last)
        t_last = now
        if it == first_it or (it + 1) % log_freq == 0 or it + 1 == iters_train:
            img_per_s = args.glb_batch_size / max(dt_ema, 1e-9)
            run.tb_log(g_it, **{'AR_iter_loss/train_loss': stats[0], 'AR_iter_loss/L_mean': stats[1],
                                'AR_iter_loss/L_tail': stats[2], 'AR_iter_loss/acc_mean': stats[3],
                                'AR_iter_loss/acc_tail': stats[4], 'AR_opt_lr/lr': lr, 'AR_opt_wd/wd': wd,
                                'AR_opt_grad/grad_norm': grad_norm, 'AR_speed/img_per_s': img_per_s})
            if run.scaler is not None:
                run.tb_log(g_it, **{'AR_opt_grad/scale_log2': math.log2(run.scaler.get_scale())})
            if iters:
                run.tb_log(g_it, **{'AR_implicit/n0_no_grad': iters[0], 'AR_implicit/n1_with_grad': iters[1]})
            if run.tb is not None:
                run.tb_log(g_it, **{f'AR_iter_scale/{k}': v for k, v in per_scale_metrics(
                    *per_token, var_wo_ddp.begin_ends, args.resos).items()})
                run.tb.flush()
            eta = timedelta(seconds=int(dt_ema * (max_it - g_it - 1)))
            gn_txt = f'{grad_norm:.3f}' if grad_norm is not None else '-'
            print(f'[ep {ep + 1:3d}/{args.ep}] [{it + 1:5d}/{iters_train}]  eta {eta}  Lm {stats[1]:.4f}  '
                  f'Lt {stats[2]:.4f}  Accm {stats[3]:.2f}  Acct {stats[4]:.2f}  lr {lr:.3e}  wd {wd:.3g}  '
                  f'tnm {gn_txt}  {img_per_s:.1f} img/s' + (f'  n0/n1 {iters[0]}/{iters[1]}' if iters else ''),
                  flush=True)

        # ---- mid-epoch checkpoints (at optimizer-step boundaries only) ----
        if stepping and it + 1 < iters_train:
            if stop_now:
                save_checkpoint(run, ep, it + 1, g_it + 1)
                raise Preempted(f'{run.stop.signame or "a signal on another rank"}: checkpoint saved in epoch {ep + 1} '
                                f'after iteration {it + 1}/{iters_train} ({run.last_path}); rerun the same command '
                                f'to resume')
            if args.ckpt_every_iters and g_it + 1 - run.last_save_g_it >= args.ckpt_every_iters:
                save_checkpoint(run, ep, it + 1, g_it + 1)
    run.last_lr_wd = lr, wd
    return stop_now, dt_ema


def end_of_epoch(run: Run, ep: int, ld_val, stop_now: bool, dt_it: Optional[float], t_start: float):
    """Epoch metrics to log.txt / TensorBoard / console; validation and checkpoint every ``--save_freq`` epochs,
    at the end, on ``--ckpt_every_iters`` and on preemption."""
    args, ep_sums = run.args, run.ep_sums
    g_end = (ep + 1) * run.iters_train
    max_it = args.ep * run.iters_train
    lr, wd = run.last_lr_wd
    n_ok = max(ep_sums[4].item(), 1)
    L_mean, L_tail, acc_mean, acc_tail = (ep_sums[:4] / n_ok).tolist()
    record = {'kind': 'epoch', 'ep': ep + 1, 'eps': args.ep, 'it': g_end, 'L_mean': L_mean, 'L_tail': L_tail,
              'acc_mean': acc_mean, 'acc_tail': acc_tail, 'lr': lr, 'wd': wd,
              'grad_norm': ep_sums[6].item() / max(ep_sums[7].item(), 1), 'skipped': int(ep_sums[5].item()),
              'remain_time': str(timedelta(seconds=int((dt_it or 0) * (max_it - g_end)))),
              'elapsed_s': round(time.time() - t_start, 1)}
    run.tb_log(ep + 1, **{f'AR_ep_loss/{k}': record[k] for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail')})
    log_txt = os.path.join(args.local_out_dir_path, 'log.txt')
    is_save_ep = (ep + 1) % args.save_freq == 0 or ep + 1 == args.ep
    improved = False
    if is_save_ep:
        t0 = time.time()
        vL_mean, vL_tail, vacc_mean, vacc_tail, n_val = evaluate(run.var_wo_ddp, run.vae, ld_val, run.dev,
                                                                 run.amp_ctx, args.seed)
        improved = vL_tail < run.best_val_tail
        run.best_val_tail = min(run.best_val_tail, vL_tail)
        val_record = {'kind': 'val', 'ep': ep + 1, 'vL_mean': vL_mean, 'vL_tail': vL_tail, 'vacc_mean': vacc_mean,
                      'vacc_tail': vacc_tail, 'best_vL_tail': run.best_val_tail, 'n': n_val}
        if dist.is_master():
            append_json_line(log_txt, val_record)
        run.tb_log(ep + 1, **{f'AR_val/{k}': val_record[k] for k in ('vL_mean', 'vL_tail', 'vacc_mean', 'vacc_tail')})
        print(f' [*] [ep {ep + 1}] (val {n_val})  Lm {vL_mean:.4f}  Lt {vL_tail:.4f}  Accm {vacc_mean:.2f}  '
              f'Acct {vacc_tail:.2f}  best Lt {run.best_val_tail:.4f}  ({time.time() - t0:.1f}s)')
    if dist.is_master():
        append_json_line(log_txt, record)
    print(f'     [ep {ep + 1}] (train) Lm {L_mean:.4f}  Lt {L_tail:.4f}  Accm {acc_mean:.2f}  Acct {acc_tail:.2f}  '
          f'remain {record["remain_time"]}', flush=True)
    if run.tb is not None:
        run.tb.flush()
    periodic = args.ckpt_every_iters and g_end - run.last_save_g_it >= args.ckpt_every_iters
    if is_save_ep or stop_now or periodic:
        ep_sums.zero_()
        save_checkpoint(run, ep + 1, 0, g_end, improved=improved)
    if stop_now:
        raise Preempted(f'{run.stop.signame or "a signal on another rank"}: checkpoint saved at the end of epoch '
                        f'{ep + 1} ({run.last_path}); rerun the same command to resume')


def _one_line(e: BaseException) -> str:
    """The user-facing sentence of an error (also when re-raised by a DataLoader worker with its traceback)."""
    msg = str(e).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1]
        msg = msg.split('Error: ', 1)[-1] if 'Error: ' in msg else msg
    return msg


def run(argv=None) -> int:
    """Parses ``argv``, trains, and returns the exit status (0 done, 1 error, 143 stopped by a signal after
    saving); the process state (stdout/stderr, signal handlers, global RNGs) is restored afterwards."""
    global _TRAINING
    _TRAINING = False
    args = parse_args(argv)
    streams = sys.stdout, sys.stderr
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    rng_states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        main(args)
        return 0
    except Preempted as e:
        print(f'[train] stopped by {e}', flush=True)
        return EXIT_PREEMPTED
    except (UserError, CheckpointError, DataError) as e:
        # set-up errors are the same on every rank: rank 0 reports them; a rank's own data error is reported by it
        if dist.get_rank() == 0 or (_TRAINING and isinstance(e, DataError)):
            print(f'[train.py] error: {_one_line(e)}', file=sys.stderr, flush=True)
        return 1
    except torch.OutOfMemoryError:
        print(f'[train.py] error: out of device memory at a per-rank batch of {getattr(args, "batch_size", "?")} images: '
              f'lower --bs or raise --ac (the same global batch in more, smaller steps), then rerun to resume',
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print('[train] interrupted (no checkpoint written since the last save)', file=sys.stderr, flush=True)
        return 130
    finally:
        for s in (sys.stdout, sys.stderr):
            if s not in streams:
                s.flush()
                s.close()
        sys.stdout, sys.stderr = streams
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        torch.set_rng_state(rng_states[0])
        random.setstate(rng_states[1])
        np.random.set_state(rng_states[2])
        dist.destroy()


if __name__ == '__main__':
    sys.exit(run())
