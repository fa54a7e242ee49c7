"""Memory accounting for the benchmarks and tests, the same way on any device.

* ``SavedTensorMeter``: peak live bytes of the tensors autograd saves for backward (the activation memory of a
  training step; parameters excluded).  Use it as ``with meter: loss = model(...); loss.backward()``.
* ``PeakMemory``: peak memory of a block of code: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU.
"""
import weakref
from typing import Optional

import torch

__all__ = ['SavedTensorMeter', 'PeakMemory', 'rss_bytes']


class _Saved:
    """Stands for one saved tensor; when autograd drops it, its storage stops counting."""
    __slots__ = ('tensor', '__weakref__')

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Live and peak bytes of the storages autograd keeps for backward while the meter is active.

    A storage saved several times (views, the same tensor for two ops) counts once; parameters (and anything in
    ``exclude``) do not count, since they are alive anyway."""

    def __init__(self, module: Optional[torch.nn.Module] = None):
        self.exclude = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
        self.live = self.peak = 0
        self._refs = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or t.device.type == 'meta':
            return t
        nbytes = storage.nbytes()
        if ptr not in self._refs:
            self._refs[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[ptr] += 1
        box = _Saved(t)
        weakref.finalize(box, self._drop, ptr, nbytes)
        return box

    @staticmethod
    def _unpack(x):
        return x.tensor if isinstance(x, _Saved) else x

    def _drop(self, ptr, nbytes):
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= nbytes

    def __enter__(self):
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        return False


def rss_bytes(field: str = 'VmRSS') -> int:
    """A field of /proc/self/status in bytes (0 where there is none, e.g. not Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (bytes, absolute: weights included) and ``m.delta``
    (peak minus what was in use when the block started).  CUDA: allocator statistics (exact, tensors only).
    CPU: the process's peak resident set, reset at entry where the kernel allows it (``m.exact`` says whether it
    did; otherwise the peak is the process's lifetime peak)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = self.delta = self.start = 0
        self.exact = True

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:    # "5" resets the peak resident set size (Linux >= 4.0)
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            except OSError:
                self.exact = False
            self.start = rss_bytes('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = max(rss_bytes('VmHWM'), rss_bytes('VmRSS'))
        self.delta = max(self.peak - self.start, 0)
        return False
