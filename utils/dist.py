"""Minimal torch.distributed helpers: works under ``torchrun`` (NCCL on GPUs, gloo on CPU) and in a plain single
process (every call then degrades to the obvious no-op)."""
import datetime
import os

import torch
import torch.distributed as tdist


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


def init_distributed(device: str = 'auto', timeout_minutes: int = 30) -> torch.device:
    """Joins the process group when launched by torchrun (RANK/WORLD_SIZE set) and returns this rank's device.

    ``device``: 'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda was asked for, but no CUDA device is visible; use --device cpu')
    if device == 'cuda':
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
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


def destroy():
    if initialized():
        tdist.destroy_process_group()
