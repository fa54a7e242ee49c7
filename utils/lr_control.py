"""Learning-rate / weight-decay schedules and AdamW parameter groups (the official VAR recipe).

``lr_ratio``: linear warm-up from ``wp0`` to 1 over ``wp_it`` iterations, then the schedule ``sche``:

* ``lin0``: flat for the first 5 % after warm-up, then linear to ``wpe`` at the last iteration (the default);
* ``lin``: the same with 15 %;  ``lin00``: linear from 1 to ``wpe`` right after warm-up;
* ``linX`` (X a float, e.g. ``lin0.3``): linear to a midpoint during the first X, then linear to ``wpe``;
* ``cos``: half-cycle cosine from 1 to ``wpe``;  ``exp``: flat 15 %, then exponential to ``wpe``.

Weight decay follows a cosine from ``wd`` (first iteration) to ``wd_end`` (last iteration).
"""
import math
from typing import Dict, Iterable, List, Tuple

import torch

__all__ = ['lr_ratio', 'wd_at', 'lr_wd_annealing', 'param_groups', 'NOWD_KEYS', 'SCHEDULES']

SCHEDULES = ('lin0', 'lin', 'lin00', 'cos', 'exp', 'linX')
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
             'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def check_schedule(sche: str) -> None:
    if sche in ('lin0', 'lin', 'lin00', 'cos', 'exp'):
        return
    if sche.startswith('lin'):
        try:
            T = float(sche[3:])
        except ValueError:
            T = -1
        if 0 < T < 1:
            return
    raise ValueError(f"unknown --sche {sche!r}: use lin0, lin, lin00, cos, exp or linX with 0 < X < 1 (e.g. lin0.3)")


def lr_ratio(sche: str, cur_it: int, wp_it: float, max_it: int, wp0: float = 0.005, wpe: float = 0.001) -> float:
    """Multiplier of the peak lr at iteration ``cur_it`` of ``max_it`` (0-based)."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        return wp0 + (1 - wp0) * cur_it / wp_it
    passed = (cur_it - wp_it) / max(1, max_it - 1 - wp_it)      # 0 -> 1 over the rest of training
    rest = 1 - passed
    if sche == 'cos':
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * passed))
    if sche in ('lin', 'lin0'):
        T = 0.15 if sche == 'lin' else 0.05
        return 1.0 if passed < T else wpe + (1 - wpe) * rest / (1 - T)
    if sche == 'lin00':
        return wpe + (1 - wpe) * rest
    if sche == 'exp':
        T = 0.15
        return 1.0 if passed < T else math.exp((passed - T) / (1 - T) * math.log(wpe))
    if sche.startswith('lin'):
        T = float(sche[3:])
        mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
        return 1 + (mid - 1) * passed / T if passed < T else wpe + (mid - wpe) * rest / (1 - T)
    raise ValueError(f'unknown lr schedule {sche!r}')


def wd_at(wd: float, wd_end: float, cur_it: int, max_it: int) -> float:
    passed = cur_it / max(1, max_it - 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * passed))


def lr_wd_annealing(sche: str, optimizer: torch.optim.Optimizer, peak_lr: float, wd: float, wd_end: float,
                    cur_it: int, wp_it: float, max_it: int, wp0: float = 0.005,
                    wpe: float = 0.001) -> Tuple[float, float]:
    """Sets every group's lr (x its ``lr_sc``) and weight decay (x its ``wd_sc``); returns (lr, wd) of the schedule."""
    lr = peak_lr * lr_ratio(sche, cur_it, wp_it, max_it, wp0=wp0, wpe=wpe)
    cur_wd = wd_at(wd, wd_end, cur_it, max_it)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_sc', 1.0)
        group['weight_decay'] = cur_wd * group.get('wd_sc', 1.0)
    return lr, cur_wd


def param_groups(model: torch.nn.Module, nowd_keys: Iterable[str] = NOWD_KEYS) -> Tuple[List[str], List[Dict]]:
    """Two AdamW groups: 'D' (weight decay) and 'ND' (no decay: 1-D tensors, biases, embeddings named in
    ``nowd_keys``).  Returns (names of the trainable parameters, groups)."""
    nowd_keys = tuple(nowd_keys)
    groups = {'D': {'name': 'D', 'params': [], 'wd_sc': 1.0, 'lr_sc': 1.0},
              'ND': {'name': 'ND', 'params': [], 'wd_sc': 0.0, 'lr_sc': 1.0}}
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names.append(name)
        no_decay = p.ndim <= 1 or name.endswith('bias') or any(k in name for k in nowd_keys)
        groups['ND' if no_decay else 'D']['params'].append(p)
    return names, [g for g in groups.values() if g['params']]
