"""Weights of the parity models, drawn from a seed: the generator and the tests draw the same numbers.

Every parameter ``name`` of shape ``shape`` is drawn from its own numpy PCG64 generator seeded by the first 8 bytes
of SHA-256(``f'{seed}/{name}'``) (so the draw does not depend on the order of the parameters), as uniform values of
unit variance made from 24-bit integers by exact arithmetic (torch.randn is not used: its vectorised and scalar CPU
paths draw different numbers, so the result would depend on the CPU), scaled by the rule of ``_draw``, then rounded
to bfloat16 and kept in float32 (exact in either precision).
The vectors store the seed, every parameter's shape and ``params_sha256`` of the draw; a test that redraws a
different set fails on the hash before it compares anything.  Only numpy, torch and hashlib are imported here: the
generator imports this module next to the official ``models`` package.
"""
import hashlib
import math
from typing import Dict, Sequence

import numpy as np
import torch

LOG_4 = math.log(4.0)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f'{seed}/{name}'.encode()).digest()[:8], 'little') & (2 ** 63 - 1)


def _draw(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Unit-variance values (N below) mapped to the rule of this parameter:

    * the attention's log temperature ``*scale_mul_1H11``: log(4) + 0.5 N (the official init is log 4);
    * 1-D ``*.weight`` (LayerNorm / GroupNorm gains): 1 + 0.1 N; other 1-D tensors (biases): 0.1 N;
    * tensors whose first dimension is 1 (position embeddings, start token, shared AdaLN gains): 0.5 N;
    * every other tensor (linear, conv, embedding, codebook): N / sqrt(fan-in), fan-in = prod(shape[1:]).
    """
    k = np.random.Generator(np.random.PCG64(_seed_of(seed, name))).integers(0, 2 ** 24, size=tuple(shape))
    x = torch.from_numpy(((k + 0.5) / 2 ** 23 - 1) * math.sqrt(3)).float()     # uniform, mean 0, variance 1
    if name.endswith('scale_mul_1H11'):
        x = LOG_4 + 0.5 * x
    elif len(shape) == 1:
        x = 1 + 0.1 * x if name.endswith('weight') else 0.1 * x
    elif shape[0] == 1:
        x = 0.5 * x
    else:
        x = x / math.sqrt(math.prod(shape[1:]))
    return x.to(torch.bfloat16).float()


def draw_params(shapes: Dict[str, Sequence[int]], seed: int) -> Dict[str, torch.Tensor]:
    """{name: tensor} for every name of ``shapes`` (in that order)."""
    return {name: _draw(name, shape, seed) for name, shape in shapes.items()}


def params_sha256(params: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names, shapes and float32 bytes (little endian) of ``params``."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to('cpu', torch.float32).contiguous()
        h.update(f'{name}:{tuple(t.shape)};'.encode())
        h.update(t.numpy().astype('<f4').tobytes())
    return h.hexdigest()
