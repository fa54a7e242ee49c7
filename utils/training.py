"""The harness train.py and train_vae.py share, so that each trainer reads top to bottom as its own recipe (in the
manner of DiT's train.py).

* ``cli``: parse the flags, run ``main(args)`` and turn every user-fixable error into one line and an exit status.
* ``start``: processes and device, the run folder, the logger (rank 0: the console and ``stdout.txt`` /
  ``stderr.txt``), SIGTERM / SIGINT turned into "save, then stop", precision, the faults a test injects (``Faults``).
* Steps: ``optimizer_step`` (GradScaler, clipping, non-finite steps skipped alike on every rank), ``Sums``
  (metric sums kept on the device), ``agree`` (every rank stops together), ``Batches`` (an unreadable image stops
  the loop at a step boundary), ``Pace``.
* Checkpoints (their layout: ``utils.train_state``): every RNG stream as tensors, atomic writes, ``fingerprint``.
* Data: loaders that never touch the global RNG, ``check_images`` (``--check_data``), TensorBoard writer.
"""
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist

from utils import dist
from utils.data import DataError, scan_images
from utils.errors import Preempted, UserError, one_line, run_cli
from utils.misc import DiskFullError, atomic_write_bytes, disk_full_cause, disk_full_message, save_atomic
from utils.model_io import CheckpointError

__all__ = ['cli', 'start', 'Run', 'StopFlag', 'TBWriter', 'optimizer_step', 'Sums', 'agree', 'Batches', 'Pace',
           'step_boundary', 'data_error', 'eval_sums', 'seed_everything', 'rng_state', 'set_rng_state',
           'random_to_tensors', 'tensors_to_random', 'rank_states', 'restore_rank_states', 'gather_object',
           'gather_tensor', 'param_fingerprint', 'fingerprint', 'wrap_ddp',
           'check_same_flags', 'write_checkpoint', 'remove_stale_temps', 'append_json_line', 'truncate_log',
           'make_loader', 'report_bad_images', 'check_images']


# ============================================== process: command line, run folder, logger ============================
class StopFlag:
    """SIGTERM / SIGINT handler: asks the loop to save and stop at the next step boundary (a second Ctrl-C
    interrupts at once)."""

    def __init__(self):
        self.signame = None

    def __call__(self, signum, frame):
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name


@dataclass
class Run:
    """What every trainer holds: its flags, device, run folder, logger, stop flag, precision, TensorBoard."""
    args: Any
    dev: torch.device
    out: str
    log: logging.Logger
    stop: StopFlag
    amp_dtype: Optional[torch.dtype] = None
    tb: Optional['TBWriter'] = None
    faults: 'Faults' = None                 # what a test injects (VIAR_TEST_FAULTS); none in normal use

    def path(self, *names: str) -> str:
        return os.path.join(self.out, *names)

    def autocast(self):
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def stopped(self, where: str) -> Preempted:
        return Preempted(f'{self.stop.signame or "a signal on another rank"}: checkpoint saved {where}; rerun the same '
                         f'command to resume')


_LOGGER: Optional[logging.Logger] = None


class _Below(logging.Filter):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


def create_logger(out_dir: str, name: str) -> logging.Logger:
    """DiT's logger: on rank 0, messages go to the console (warnings to stderr) and to ``stdout.txt`` (everything)
    and ``stderr.txt`` (warnings and errors) of the run folder, with a time stamp; other ranks log nothing (and
    their stdout goes to /dev/null)."""
    global _LOGGER
    close_logger()
    logger = logging.getLogger(f'viar.{name}')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if dist.is_master():
        stamped = logging.Formatter('[%(asctime)s] %(message)s', datefmt='%m-%d %H:%M:%S')
        handlers = [(logging.StreamHandler(sys.stdout), logging.INFO, True, None),
                    (logging.StreamHandler(sys.stderr), logging.WARNING, False, None),
                    (logging.FileHandler(os.path.join(out_dir, 'stdout.txt'), encoding='utf-8'), logging.INFO, False,
                     stamped),
                    (logging.FileHandler(os.path.join(out_dir, 'stderr.txt'), encoding='utf-8'), logging.WARNING, False,
                     stamped)]
        for h, level, below_warning, fmt in handlers:
            h.setLevel(level)
            if below_warning:
                h.addFilter(_Below(logging.WARNING))
            h.setFormatter(fmt or logging.Formatter('%(message)s'))
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
        sys.stdout = open(os.devnull, 'w')
        warnings.filterwarnings('ignore')
    _LOGGER = logger
    return logger


def close_logger():
    global _LOGGER
    if _LOGGER is not None:
        for h in list(_LOGGER.handlers):
            _LOGGER.removeHandler(h)
            h.close()
    _LOGGER = None


def _record_in_files(line: str):
    """The line ``run_cli`` prints on the console also goes to the run folder's files (rank 0)."""
    if _LOGGER is not None:
        rec = _LOGGER.makeRecord(_LOGGER.name, logging.ERROR, __file__, 0, line, None, None)
        for h in _LOGGER.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(rec)


def cli(main: Callable[[Any], Optional[int]], parse_args: Callable, argv=None, prog: str = 'train.py',
        oom_hint: Callable[[Any], str] = lambda args: 'lower --bs') -> int:
    """Parses ``argv``, runs ``main(args)`` and returns the exit status (0 done, 1 a user-fixable error printed as
    one line, 143 stopped by a signal after saving, 130 a second Ctrl-C).  ``main`` takes over the process (its
    streams, signal handlers, random generators, process group): run a trainer as a process of its own."""
    args = parse_args(argv)

    def body():
        try:
            return main(args)
        except torch.OutOfMemoryError as err:
            raise UserError(f'out of device memory: {oom_hint(args)}, then rerun the same command (it resumes from '
                            f'the last checkpoint)') from err
        except (OSError, RuntimeError) as e:     # a full disk met by a write other than the checkpoints' own
            full = disk_full_cause(e)
            if full is None:
                raise
            where = full.filename or getattr(args, 'local_out_dir_path', '.')
            raise DiskFullError(f'{disk_full_message(where, full, kept="the checkpoints are kept")}, then rerun the '
                                f'same command (it resumes from the last checkpoint)') from e
        except (UserError, Preempted) as e:
            _record_in_files(f'{"stopped" if isinstance(e, Preempted) else "error"}: {one_line(e)}')
            raise

    try:
        return run_cli(body, prog, interrupted='interrupted (no checkpoint written since the last save)')
    finally:
        close_logger()
        dist.destroy()


def start(args, prog: str, subdirs: Sequence[str] = ()) -> Run:
    """Processes and device, the run folder ``--local_out_dir_path`` (with ``subdirs``; temporary files an
    interrupted save left there are removed), the logger, the stop flag, and precision (``--fp16``: 0 fp32, 1
    float16 + GradScaler on CUDA -- bfloat16 on CPU --, 2 bfloat16)."""
    dev = dist.init_distributed(args.device)
    if getattr(args, 'threads', 0) > 0:
        torch.set_num_threads(args.threads)
    out = args.local_out_dir_path
    try:
        for d in ('', *subdirs):
            os.makedirs(os.path.join(out, d), exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --local_out_dir_path {out!r}: {e.strerror}') from e
    name = prog.split('.')[0]
    log = create_logger(out, name)
    if dist.get_local_rank() == 0:
        n, nbytes = remove_stale_temps(out, subdirs)
        if n:
            log.info(f'[{name}] removed {n} temporary file(s) ({nbytes / 2 ** 20:.1f} MiB) left by an interrupted save')
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True   # fixed shapes: the tokenizer's convolutions pick their fastest kernels
        if hasattr(args, 'tf32'):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    amp_dtype = {0: None, 1: torch.float16, 2: torch.bfloat16}[args.fp16]
    if amp_dtype is torch.float16 and dev.type != 'cuda':
        log.info(f'[{name}] --fp16=1 (float16 + GradScaler) needs CUDA; on CPU training runs in bfloat16 autocast '
                 'instead')
        amp_dtype = torch.bfloat16
    log.info(f'[{name}] {" ".join(sys.argv)}')
    return Run(args=args, dev=dev, out=out, log=log, stop=stop, amp_dtype=amp_dtype, faults=Faults.from_env())


def remove_stale_temps(out_dir: str, subdirs: Sequence[str] = ()) -> Tuple[int, int]:
    """Deletes the temporary files of atomic writes (``utils.misc``: ``.{name}.{8 random}.tmp``; the best-checkpoint
    link ``{name}.tmp``) that a killed save left in the run folder.  Returns (files, bytes)."""
    pattern = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$|^[^.].*\.pth\.tmp$')
    n = nbytes = 0
    for d in ('', *subdirs):
        folder = os.path.join(out_dir, d)
        for e in (os.scandir(folder) if os.path.isdir(folder) else ()):
            if pattern.match(e.name) and e.is_file(follow_symlinks=False):
                try:
                    size = e.stat().st_size
                    os.unlink(e.path)
                    n, nbytes = n + 1, nbytes + size
                except OSError:
                    pass
    return n, nbytes


# ============================================== optimisation steps ====================================================
def optimizer_step(opt: torch.optim.Optimizer, scaler, params: Sequence[torch.Tensor], clip: float,
                   max_scale: Optional[float] = None, set_to_none: bool = True) -> Optional[float]:
    """Unscale (GradScaler), clip the gradient norm to ``clip`` (<= 0: no clipping), step, zero the gradients.
    Returns the norm, or None when it was not finite and the step was skipped.  Under DDP the gradients are the
    same on every rank after backward, so every rank skips the same steps (a rank's non-finite loss makes every
    rank's gradient non-finite).  ``max_scale``: cap of the GradScaler's scale."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float('inf')).item()
    finite = math.isfinite(norm)
    if scaler is not None:
        scaler.step(opt)                # skipped by the scaler itself on inf / nan gradients (it lowers its scale)
        scaler.update(new_scale=max_scale if max_scale and scaler.get_scale() > max_scale else None)
    elif finite:
        opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    return norm if finite else None


class Sums:
    """Named float64 sums kept on the device: adding a device tensor costs no host sync.  ``mean_over_ranks``
    all-reduces a copy (a collective: every rank calls it at the same point)."""

    def __init__(self, names: Sequence[str], dev):
        self.names = tuple(names)
        self.t = torch.zeros(len(self.names), dtype=torch.float64, device=dev)

    def add(self, first: str, values: torch.Tensor):
        """Adds the 1-D device tensor ``values`` to consecutive fields from ``first`` on."""
        i = self.names.index(first)
        self.t[i:i + values.numel()] += values.detach()

    def inc(self, **numbers: float):
        """Adds host numbers to the named fields (no host-to-device copy to wait for)."""
        for k, v in numbers.items():
            self.t[self.names.index(k)] += v

    def mean_over_ranks(self) -> Dict[str, float]:
        return dict(zip(self.names, dist.allreduce_mean(self.t.clone()).tolist()))

    def zero_(self):
        self.t.zero_()

    def state(self) -> torch.Tensor:
        return self.t.detach().cpu().clone()

    def load(self, t: torch.Tensor):
        self.t.copy_(t.to(self.t))


def agree(dev, *flags: bool) -> List[bool]:
    """Each flag is True on every rank if it is True on any (one small all-reduce; nothing without DDP)."""
    if not dist.initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=dev)
    tdist.all_reduce(t)
    return [v > 0 for v in t.tolist()]


class Batches:
    """Batches of a DataLoader, ``take(n)`` at a time.  An unreadable image (``DataError``, also when a worker
    re-raises it) ends the iteration and is kept in ``error`` (one line) instead of propagating: the trainer agrees
    with the other ranks, saves the checkpoint of the last optimizer step, then reports it."""

    def __init__(self, loader):
        self._it = iter(loader)
        self.error: Optional[str] = None

    def take(self, n: int) -> list:
        out = []
        while len(out) < n and self.error is None:
            try:
                out.append(next(self._it))
            except DataError as e:
                self.error = one_line(e)
            except StopIteration:
                break
        return out

    def __iter__(self):
        while True:
            batch = self.take(1)
            if not batch:
                return
            yield batch[0]


def epochs(t, sampler, n_epochs: int) -> Iterator[Tuple[int, int]]:
    """(epoch, first iteration) of every epoch left of ``n_epochs``: the one a checkpoint stopped in continues at
    ``t.start_it`` (its sums restored), every other starts at 0 with ``t.ep_sums`` zeroed; ``sampler`` (a
    ``ResumableBatchSampler``) is set to that epoch and iteration first.  ``t``: a trainer with ``start_ep``,
    ``start_it`` and ``ep_sums``."""
    for ep in range(t.start_ep, n_epochs):
        first = t.start_it if ep == t.start_ep else 0
        if first == 0:
            t.ep_sums.zero_()
        sampler.set_epoch(ep, first)
        yield ep, first


def step_boundary(run: Run, batches: Batches, save: Callable[[], Any], where: str, untrained: bool = False):
    """At an optimizer-step boundary, on every rank: when any rank read an unreadable image or got SIGTERM / Ctrl-C,
    every rank saves the checkpoint of this boundary (``save()``, a collective) and stops -- with a DataError naming
    the image, or ``Preempted``.  ``where``: 'in epoch E before iteration I (path)'.  ``untrained``: no optimizer step
    was taken yet, so nothing is saved (a checkpoint of untrained weights would pass for a trained one)."""
    stop, bad = agree(run.dev, run.stop.signame, batches.error)
    if bad or stop:
        if untrained:
            if bad:
                raise data_error(batches.error, 'before the first step: nothing was trained, no checkpoint written')
            raise Preempted(f'{run.stop.signame or "a signal on another rank"} before the first step: nothing was '
                            f'trained, no checkpoint written; rerun the same command to start')
        save()
        if bad:
            raise data_error(batches.error, f'checkpoint saved {where}')
        raise run.stopped(where)


def data_error(error: Optional[str], context: str) -> DataError:
    """The unreadable image of some rank (a collective: every rank passes its own error or None) as one DataError."""
    first = next(e for e in gather_object(error) if e)
    return DataError(f'{first} [{context}; --check_data lists every unreadable image at once, --skip_bad_images '
                     f'replaces them]')


def eval_sums(run: Run, loader, batch_sums: Callable[[Any], torch.Tensor],
              seed: Optional[int] = None) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """Sums of ``batch_sums(batch)`` (float64 vectors) over ``loader``, averaged over ranks -> (sums, None), or
    (None, this rank's error or None) when some rank read an unreadable image (no rank raises alone: the others
    would wait for it).  ``seed``: run on a forked RNG seeded so (deterministic; the caller's RNG streams untouched)."""
    total, batches, dev = None, Batches(loader), run.dev
    fork = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == 'cuda' else []
    with torch.random.fork_rng(devices=fork, device_type='cuda', enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for batch in batches:
            v = batch_sums(batch)
            total = v if total is None else total + v
    if agree(run.dev, batches.error)[0]:
        return None, batches.error
    return dist.allreduce_mean(total), None


class Pace:
    """Seconds per iteration (exponential moving average) and the time left."""

    def __init__(self):
        self.dt, self._last = None, time.time()

    def tick(self):
        now = time.time()
        self.dt = now - self._last if self.dt is None else 0.9 * self.dt + 0.1 * (now - self._last)
        self._last = now

    def left(self, iterations: int) -> timedelta:
        return timedelta(seconds=int((self.dt or 0) * max(iterations, 0)))


# ============================================== RNG states, gathers, DDP ==============================================
def seed_everything(seed: int, rank: int = 0, world_size: int = 1, offset: int = 0):
    """Python, numpy and torch global RNGs from (seed, rank, offset)."""
    s = (seed * world_size + rank + offset * 7919) % (2 ** 63)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


def random_to_tensors(state) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ``random.getstate()`` as (int64 tensor, float64 tensor)."""
    version, internal, gauss = state
    return torch.tensor([version, *internal, 0 if gauss is None else 1], dtype=torch.int64), \
        torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)


def tensors_to_random(t: torch.Tensor, gauss: torch.Tensor):
    v = t.tolist()
    return v[0], tuple(v[1:-1]), (gauss.item() if v[-1] else None)


def rng_state(dev: torch.device) -> dict:
    """This process's torch (CPU and CUDA), Python and numpy RNG states, as tensors."""
    py_t, py_g = random_to_tensors(random.getstate())
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
    if 'python' in state:
        random.setstate(tensors_to_random(state['python'], state['python_gauss']))
        pos, has_gauss, cached = state['numpy_extra'].tolist()
        np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))


def rank_states(run: Run, sums: 'Sums') -> dict:
    """Collective: what a checkpoint's 'resume' needs per rank for an exact resume: RNG states ('rng') and epoch
    sums ('rank_ep_sums'; 'ep_sums' is their mean, for a resume by another number of ranks)."""
    rank_sums = gather_tensor(sums.t)
    return {'rng': gather_object(rng_state(run.dev)), 'rank_ep_sums': rank_sums, 'ep_sums': rank_sums.mean(0)}


def restore_rank_states(run: Run, res: dict, sums: 'Sums', mid_epoch: bool) -> bool:
    """This rank's RNG states and (``mid_epoch``) epoch sums from a checkpoint's 'resume'.  Returns False, restoring
    only the mean epoch sums, when it was written by another number of ranks."""
    rngs, rank_sums, rank = res.get('rng'), res.get('rank_ep_sums'), dist.get_rank()
    exact = rngs is not None and len(rngs) == dist.get_world_size()
    if exact:
        set_rng_state(rngs[rank], run.dev)
    if mid_epoch and (rank_sums is not None or 'ep_sums' in res):
        sums.load(rank_sums[rank] if exact and rank_sums is not None else res['ep_sums'])
    return exact


def gather_object(obj) -> list:
    if not dist.initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """(world size, *t.shape) on the CPU."""
    if not dist.initialized():
        return t.unsqueeze(0).cpu()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    tdist.all_gather(out, t)
    return torch.stack(out).cpu()


@torch.no_grad()
def param_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Per-parameter (sum, sum of squares) in float64: equal on all ranks iff DDP kept them in sync."""
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                        for p in model.parameters()]).flatten()


def fingerprint(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str:
    """Identity of a model: SHA-256 of the names, shapes and float32 bytes of the tensors ``keys`` (16 hex digits)."""
    h = hashlib.sha256()
    for k in keys:
        if k in state_dict:
            t = state_dict[k].detach().to('cpu', torch.float32).contiguous()
            h.update(f'{k}{tuple(t.shape)}'.encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def wrap_ddp(model: torch.nn.Module, dev: torch.device, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun (itself otherwise): gradients are views of the
    all-reduce buckets (no second copy of them), buffers are not re-broadcast every step (constants, or statistics
    each rank keeps in sync itself)."""
    if dist.get_world_size() == 1:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                      else {'broadcast_buffers': False})
    return DDP(model, device_ids=[dev.index] if dev.type == 'cuda' else None, find_unused_parameters=find_unused,
               gradient_as_bucket_view=True, **no_buffer_sync)


# ============================================== checkpoints and logs ==================================================
def check_same_flags(saved: dict, given: dict, flags: Sequence[str], path: str):
    """A resumed run must keep the flags that fix the architecture."""
    for k in flags:
        if k in saved and k in given and saved[k] != given[k]:
            raise CheckpointError(
                f'{path!r} was written by a run with --{k} {saved[k]}, but this command gives --{k} {given[k]}: '
                f'rerun with the same flags to resume it, or pass another --local_out_dir_path to start a new run')


def write_checkpoint(obj, path: str, best_path: Optional[str] = None):
    """Writes ``obj`` to ``path`` atomically (call on the writing rank); with ``best_path`` that file becomes the same
    bytes (a hard link, a copy where links are not possible)."""
    try:
        save_atomic(obj, path)
        if best_path:
            tmp = best_path + '.tmp'
            if os.path.exists(tmp):
                os.unlink(tmp)
            try:
                os.link(path, tmp)          # same bytes, no copy; the next save replaces path, not best_path
                os.replace(tmp, best_path)
            except OSError:
                save_atomic(obj, best_path)
    except DiskFullError as e:
        raise DiskFullError(f'{e}, then rerun the same command (it resumes from the previous checkpoint)') from e
    except OSError as e:
        raise UserError(f'could not write {path!r} ({e.strerror or e}): free disk space and rerun the same command '
                        f'(it resumes from the previous checkpoint)') from e


def append_json_line(path: str, record: dict):
    try:
        with open(path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        if disk_full_cause(e) is None:
            raise
        raise DiskFullError(f'{disk_full_message(path, e)}, then rerun the same command (it resumes from the last '
                            f'checkpoint)') from e


def truncate_log(path: str, epoch: int):
    """On resume: drop the JSON lines of epochs after ``epoch`` (they are trained and logged again)."""
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


# ============================================== data ==================================================================
def _worker_init(worker_id: int):
    """DataLoader worker init.  The worker leaves the training's process group: a scheduler's (or ``timeout``'s, or the
    terminal's Ctrl-C) signal to the whole group would otherwise kill it and end the training in a DataLoader error
    instead of the "save, then stop" of the main process, which shuts its workers down itself (a signal sent to the
    worker's own pid, as ``multiprocessing`` does at exit, still ends it).  On Linux the worker also gets SIGKILL when
    the training process dies, even by SIGKILL, instead of lingering until its watchdog notices."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if sys.platform.startswith('linux'):
        try:
            import ctypes
            ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


@dataclass(frozen=True)
class Faults:
    """Faults a test injects into a training run, read once from ``VIAR_TEST_FAULTS`` (unset in normal use), e.g.
    ``'kill_at=7 signal=KILL'``: at global iteration 7 deliver SIGKILL to this process (TERM, KILL, INT; TERM_GROUP:
    SIGTERM to the whole process group, as a scheduler does); ``'nonfinite_at=1,2,3'``: a NaN loss at those
    iterations."""
    kill_at: int = -1
    signal: str = 'TERM'
    nonfinite_at: frozenset = frozenset()

    @classmethod
    def from_env(cls) -> 'Faults':
        kw = dict(item.split('=', 1) for item in os.environ.get('VIAR_TEST_FAULTS', '').split())
        return cls(kill_at=int(kw.get('kill_at', -1)), signal=kw.get('signal', 'TERM'),
                   nonfinite_at=frozenset(int(x) for x in kw.get('nonfinite_at', '').split(',') if x))

    def kill(self, g_it: int):
        if g_it != self.kill_at:
            return
        if self.signal == 'TERM_GROUP':
            os.killpg(os.getpgid(0), signal.SIGTERM)
        else:
            os.kill(os.getpid(), getattr(signal, 'SIG' + self.signal))


def make_loader(dataset, dev, workers: int, seed: int, **kw):
    """A DataLoader with its own generator (worker seeds never come from the global RNG: resuming stays exact
    whatever the worker count), pinned memory on CUDA, and persistent workers: each loader forks its workers once, an
    evaluation loader (no batch sampler) at once, here.
    (A validation loader that forked new workers at every evaluation could hang on Python 3.11: a fork while another
    thread -- e.g. the queue feeder thread of the previous evaluation's workers -- is exiting can leave the child
    waiting forever on an interpreter lock, seen as a training stuck in its validation.)"""
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, num_workers=workers, pin_memory=dev.type == 'cuda', persistent_workers=workers > 0,
                        worker_init_fn=_worker_init if workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed + dist.get_rank()), **kw)
    if workers > 0 and 'batch_sampler' not in kw:
        iter(loader)        # an evaluation loader forks its workers now, while no other Python thread comes or goes
    return loader


def report_bad_images(run: Run, datasets) -> int:
    """``--skip_bad_images``: logs how many image files were found unreadable so far (each counted once, whichever
    rank or worker read it and however often; a collective), and returns it."""
    mine = [(i, j) for i, d in enumerate(datasets) for j in (d.bad_indices() if hasattr(d, 'bad_indices') else ())]
    n = len({b for part in gather_object(mine) for b in part})
    if n:
        run.log.warning(f'[data] {n} unreadable image file(s) so far, each replaced by the next readable image '
                        f'(--skip_bad_images); --check_data lists them')
    return n


def check_images(run: Run, datasets: Sequence, workers: int, shown: int = 5):
    """``--check_data``: decodes every image of ``datasets`` (each rank a share, ``workers`` processes each), writes
    the unreadable ones to ``bad_images.txt`` of the run folder and raises one UserError naming the first few; logs
    that all decode otherwise."""
    paths = [p for d in datasets for p, _ in d.samples]
    empty = [(os.path.join(d.root, c), 'class folder without images') for d in datasets
             for c in getattr(d, 'empty_classes', ())]
    rank, world = dist.get_rank(), dist.get_world_size()
    run.log.info(f'[data] decoding {len(paths):,} images ({world} process(es) x {max(workers, 1)} worker(s)) ...')
    t0 = time.time()
    bad = sorted(b for part in gather_object(scan_images(paths[rank::world], workers)) for b in part)
    listing = run.path('bad_images.txt')
    bad_files = len(bad)
    bad += empty
    if dist.is_master():
        with open(listing, 'w', encoding='utf-8') as f:
            f.writelines(f'{p}\t{why}\n' for p, why in bad)
    dist.barrier()
    if bad:
        names = ', '.join(repr(p) for p, _ in bad[:shown]) + (', ...' if len(bad) > shown else '')
        what = [f'{bad_files} of {len(paths):,} images cannot be decoded'] if bad_files else []
        what += [f'{len(empty)} class folder(s) hold no images'] if empty else []
        raise DataError(f'{" and ".join(what)} (all listed in {listing}): {names}; delete or replace them (or train '
                        f'with --skip_bad_images; remove or fill empty class folders), then run without --check_data')
    run.log.info(f'[data] all {len(paths):,} images decode ({time.time() - t0:.0f}s); {listing} is empty')


# ============================================== TensorBoard ===========================================================
class TBWriter:
    """TensorBoard scalars and images, written with tensorboard's record writer (``torch.utils.tensorboard`` would
    import TensorFlow when it is installed: seconds of start-up and log noise).  ``purge_step``: on resume,
    TensorBoard hides the events of the previous run from that step on (they are trained and logged again)."""

    def __init__(self, log_dir: str, purge_step=None, flush_secs: float = 30):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
        self._Event, self._Summary = Event, Summary
        os.makedirs(log_dir, exist_ok=True)
        name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0'
        self._rec = RecordWriter(open(os.path.join(log_dir, name), 'ab'))
        self._flush_secs, self._last_flush = flush_secs, time.time()
        self._write(Event(wall_time=time.time(), file_version='brain.Event:2'))
        if purge_step:
            self._write(Event(wall_time=time.time(), step=int(purge_step),
                              session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event):
        self._rec.write(event.SerializeToString())
        if time.time() - self._last_flush > self._flush_secs:
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int):
        value = self._Summary.Value(tag=tag, simple_value=float(value))
        self._write(self._Event(wall_time=time.time(), step=int(step), summary=self._Summary(value=[value])))

    def scalars(self, step: int, values: Mapping[str, Optional[float]], prefix: str = ''):
        for k, v in values.items():
            if v is not None:
                self.add_scalar(prefix + k, v, step)

    def add_png(self, tag: str, png: bytes, h: int, w: int, step: int):
        img = self._Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=png)
        value = self._Summary.Value(tag=tag, image=img)
        self._write(self._Event(wall_time=time.time(), step=int(step), summary=self._Summary(value=[value])))

    def flush(self):
        self._rec.flush()
        self._last_flush = time.time()

    def close(self):
        self.flush()
        self._rec.close()
