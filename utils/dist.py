"""Minimal torch.distributed helpers: works under ``torchrun`` (NCCL on GPUs, gloo on CPU) and in a plain single
process (every call then degrades to the obvious no-op)."""
import datetime
import os
import sys
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as tdist

from utils.errors import UserError

# files that exist where an NVIDIA driver is installed and a GPU is present (monkeypatched by the tests)
NVIDIA_MARKERS = ('/dev/nvidia0', '/proc/driver/nvidia/version')


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', 0))


def is_master() -> bool:
    return get_rank() == 0


def cuda_status() -> Tuple[bool, Optional[str]]:
    """(CUDA usable, why not -- None when it is, or when no NVIDIA device is there to use anyway).  The reason is
    torch's own where it gives one (e.g. 'The NVIDIA driver on your system is too old')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ok = torch.cuda.is_available()
    if ok:
        return True, None
    hidden = os.environ.get('CUDA_VISIBLE_DEVICES', None) in ('', '-1')
    present = [m for m in NVIDIA_MARKERS if os.path.exists(m)]
    if not present or hidden:
        return False, None
    if torch.version.cuda is None:
        why = f'this PyTorch {torch.__version__} is a CPU-only build; install a CUDA build of PyTorch'
    else:
        said = [' '.join(str(w.message).split()) for w in caught]
        why = said[0] if said else (f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable device; '
                                    f'check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES')
    return False, f'{present[0]} exists but CUDA is unusable: {why}'


def init_distributed(device: str = 'auto', timeout_minutes: int = 30) -> torch.device:
    """Joins the process group when launched by torchrun (RANK/WORLD_SIZE set) and returns this rank's device.

    ``device``: 'auto' (CUDA if available, else CPU, saying so in one line when NVIDIA devices exist but CUDA is
    unusable), 'cpu', 'cuda' or 'cuda:N' (device N, one process)."""
    index = None
    if device.startswith('cuda:') and device[5:].isdigit():
        device, index = 'cuda', int(device[5:])
    if device in ('auto', 'cuda'):
        usable, why = cuda_status()
        if device == 'cuda' and not usable:
            raise UserError(f'--device cuda was asked for, but CUDA is unusable ({why or "no NVIDIA device found"}); '
                            f'use --device cpu')
        device = 'cuda' if usable else 'cpu'
        if not usable and why and get_local_rank() == 0:
            print(f'[device] note: running on the CPU (much slower): {why}; pass --device cpu to silence this',
                  file=sys.stderr, flush=True)
    if device == 'cuda':
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count() if index is None else index)
    dev = torch.device('cuda', torch.cuda.current_device()) if device == 'cuda' else torch.device('cpu')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                 device_id=dev if dev.type == 'cuda' else None)
    return dev


def barrier():
    if initialized():
        tdist.barrier()


def allreduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (returns ``t``)."""
    if initialized():
        tdist.all_reduce(t)
        t.div_(get_world_size())
    return t


def broadcast_object(obj, src: int = 0):
    if not initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def destroy(sync: bool = False):
    """Leaves the process group.  ``sync`` (on the way out of a run that succeeded on every rank): a barrier first, so
    that no rank tears down its gloo connections while another still reads the last collective from them (which
    ended in an abort, 'terminate called without an active exception', at exit under load)."""
    if initialized():
        if sync:
            tdist.barrier()
        tdist.destroy_process_group()
