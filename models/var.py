"""VAR and VIAR: next-scale prediction transformers.

The transformer is embeddings -> backbone -> head, with two independent choices:

* the **backbone** (``use_implicit``): ``ExplicitBackbone`` (VAR: ``depth`` AdaLN self-attention blocks) or
  ``ImplicitBackbone`` (VIAR: ``pre_depth`` pre blocks, one implicit equilibrium block iterated as
  ``z <- implicit_block(proj([z ; u]))`` from ``z = u`` (u: output of the pre blocks, the input injection), then
  ``post_depth`` post blocks; trained with Jacobian-free backprop, sampled with a per-scale iteration count);
* the **scale paradigm** (the class): ``VAR`` here predicts residual token maps of a fixed list of scales (the
  tokenizer sums them into ``f_hat``); ``models.flexvar.FlexVAR`` overrides the few methods marked "scale paradigm"
  below (positions, the next scale's input, decoding) to predict each scale's own token map for any schedule.

The backbone is a submodule (``var.backbone``: ``train()``, ``eval()``, ``to()`` reach it); the state dict keeps the
names of the published checkpoints (``blocks.*`` or ``implicit_block_projection.*``, ``pre_blocks.*``,
``implicit_block.*``, ``post_blocks.*``, without ``backbone.``): a key remap on save and load (``published_key``).
"""
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .basic_var import AdaLNBeforeHead, AdaLNSelfAttn
from .helpers import gumbel_softmax_with_rng, sample_with_top_k_top_p_

__all__ = ['VAR', 'ExplicitBackbone', 'ImplicitBackbone', 'FixedPointOptions', 'iterations_per_scale',
           'block_causal_mask', 'get_edit_mask', 'anderson_step', 'published_key', 'IMPLICIT_ATTRS', 'ITER_EXITS',
           'ITER_SOLVERS']

# VIAR's official iteration attributes (``var.implicit_no_grad_min_iters = 3`` ...): they live on the backbone
IMPLICIT_ATTRS = ('implicit_no_grad_min_iters', 'implicit_no_grad_max_iters', 'implicit_with_grad_min_iters',
                  'implicit_with_grad_max_iters', 'implicit_eval_iters')


ITER_EXITS = ('batch', 'row')            # who stops together under an early-exit tolerance
ITER_SOLVERS = ('picard', 'anderson')    # how the next iterate is made from the last evaluations


@dataclass(frozen=True)
class FixedPointOptions:
    """How sampling solves VIAR's implicit fixed point z = f(z) at each scale (docs/compute_control.md).

    * ``tol``: early exit once the relative residual ``|f(x) - x| / |f(x)|`` is <= tol (None: the fixed schedule);
    * ``exit``: 'batch' (a scale stops when every row of the batch is below ``tol``) or 'row' (each image -- its
      conditional and unconditional row together -- stops on its own; the iterations run on the images still
      active, and a stopped image's last keys and values fill its slot in the caches of the later iteration indices);
    * ``solver``: 'picard' (x <- f(x), the paper's iteration) or 'anderson' (Anderson acceleration of each row with
      memory ``anderson_m`` and damping ``anderson_beta``);
    * ``warm_start``: a scale's first iterate is the previous scale's fixed point upsampled (bicubic), not u.

    Whatever the solver, a scale's output is the last evaluation f(x) of each row."""
    tol: Optional[float] = None
    exit: str = 'batch'
    solver: str = 'picard'
    anderson_m: int = 5
    anderson_beta: float = 1.0
    warm_start: bool = False

    def __post_init__(self):
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f'iter_tol must be >= 0, got {self.tol}')
        if self.exit not in ITER_EXITS:
            raise ValueError(f"iter_exit must be one of {', '.join(ITER_EXITS)}, got {self.exit!r}")
        if self.solver not in ITER_SOLVERS:
            raise ValueError(f"iter_solver must be one of {', '.join(ITER_SOLVERS)}, got {self.solver!r}")
        if not (isinstance(self.anderson_m, int) and self.anderson_m >= 1):
            raise ValueError(f'anderson_m must be an int >= 1, got {self.anderson_m!r}')
        if not 0 < self.anderson_beta <= 1:
            raise ValueError(f'anderson_beta must be in (0, 1], got {self.anderson_beta}')


def anderson_step(hist: Optional[Tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, g: torch.Tensor, m: int,
                  beta: float = 1.0, lam: float = 1e-4):
    """One Anderson-acceleration step for each row (first dimension) on its own: with the last ``m`` inputs x_k and
    evaluations f_k = f(x_k) of the row (``hist``, then x and g = f(x)), the weights a (summing to 1) minimise
    ``|sum_k a_k (f_k - x_k)|`` (Tikhonov ``lam`` relative to the mean squared residual), and the next iterate is
    ``beta sum a_k f_k + (1 - beta) sum a_k x_k``.  Computed in fp32; returns (next iterate in g's dtype and shape,
    the new history).  With one entry (the first step) it is ``beta g + (1 - beta) x``: g itself for beta = 1."""
    xf, gf = x.float().flatten(1).unsqueeze(1), g.float().flatten(1).unsqueeze(1)
    X = xf if hist is None else torch.cat((hist[0], xf), dim=1)[:, -m:]
    Fv = gf if hist is None else torch.cat((hist[1], gf), dim=1)[:, -m:]
    k = X.shape[1]
    if k == 1:
        return (g if beta == 1 else (beta * gf + (1 - beta) * xf).view_as(g).to(g.dtype)), (X, Fv)
    G = Fv - X                                                          # residuals (R, k, D)
    H = G @ G.transpose(1, 2)                                           # (R, k, k)
    reg = lam * H.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    H = H + reg.view(-1, 1, 1) * torch.eye(k, dtype=H.dtype, device=H.device)
    w = torch.linalg.solve(H, torch.ones(H.shape[0], k, 1, dtype=H.dtype, device=H.device))
    a = (w / w.sum(dim=1, keepdim=True)).transpose(1, 2)                # (R, 1, k)
    nxt = a @ Fv if beta == 1 else beta * (a @ Fv) + (1 - beta) * (a @ X)
    ok = torch.isfinite(nxt).all(dim=2, keepdim=True)                   # a singular system: plain step for that row
    nxt = torch.where(ok, nxt, gf)
    return nxt.view_as(g).to(g.dtype), (X, Fv)


def upsample_tokens(z_BlC: torch.Tensor, l: int) -> torch.Tensor:
    """The tokens (B, p0*p0, C) of a square map resized (bicubic, in fp32) to (B, l, C), l = p*p."""
    B, l0, C = z_BlC.shape
    p0, p = math.isqrt(l0), math.isqrt(l)
    z_BCpp = z_BlC.float().transpose(1, 2).reshape(B, C, p0, p0)
    return F.interpolate(z_BCpp, size=(p, p), mode='bicubic').flatten(2).transpose(1, 2).to(z_BlC.dtype)


def iterations_per_scale(iter_left: int, iter_right: int, num_scales: int) -> List[int]:
    """Implicit iterations at each scale: ``int(linspace(iter_left, iter_right, K)[k])`` (cast toward zero)."""
    if min(iter_left, iter_right) < 0:
        raise ValueError(f'iteration counts must be >= 0, got iter_left={iter_left}, iter_right={iter_right}')
    return [int(n) for n in np.linspace(iter_left, iter_right, num_scales)]


def block_causal_mask(patch_nums: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale index of each token (1, L), additive mask (1, 1, L, L)): a token of scale i sees every token of the
    scales <= i."""
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, -1, 1)
    dT = d.transpose(1, 2)
    return dT[:, 0].contiguous(), torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, d.shape[1], d.shape[1])


def get_edit_mask(patch_nums: Sequence[int], y0: float, x0: float, y1: float, x1: float, device='cpu',
                  inpainting: bool = True) -> torch.Tensor:
    """The zero-shot editing mask of VAR's notebook on the last scale's grid (pn, pn): 1 keeps the input image's token,
    0 lets the model generate it.  The box ``[y0, y1) x [x0, x1)`` (fractions of the side) is 1, the rest 0;
    ``inpainting`` inverts it (the box is generated, the rest kept)."""
    pn = patch_nums[-1]
    mask = torch.zeros(pn, pn, device=device)
    mask[round(y0 * pn):round(y1 * pn), round(x0 * pn):round(x1 * pn)] = 1
    return 1 - mask if inpainting else mask


def _keep_map(edit_mask: torch.Tensor, B: int, pn: int) -> torch.Tensor:
    """Which tokens of a pn x pn scale are teacher-forced (B, pn*pn, 1) bool: the mask resized bilinearly
    (align_corners False) and thresholded at 0.5; scales of <= 3 tokens keep every token (the notebook's rule)."""
    if pn * pn <= 3:
        return torch.ones(B, pn * pn, 1, dtype=torch.bool, device=edit_mask.device)
    m = edit_mask if edit_mask.ndim == 3 else edit_mask.unsqueeze(0).expand(B, *edit_mask.shape[-2:])
    m = F.interpolate(m.unsqueeze(1).float(), size=(pn, pn), mode='bilinear', align_corners=False).gt(0.5)
    return m.view(B, pn * pn, 1)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)   # B16C


def _maybe_checkpoint(enabled: bool, fn, *args):
    """``fn(*args)``, recomputed in backward (activation checkpointing) when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ============================================== backbones =============================================================
class ExplicitBackbone(nn.Module):
    """VAR: a stack of ``depth`` blocks."""

    is_implicit = False

    def __init__(self, make_block, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([make_block(i) for i in range(depth)])
        self.grad_checkpointing = False

    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return list(self.blocks)

    def draw_iters(self, rng: Optional[random.Random] = None) -> None:
        """VAR has no fixed-point iterations (VIAR: the (n0, n1) of one training step)."""
        return None

    def schedule(self, iter_left: int, iter_right: int, num_scales: int) -> List[int]:
        """Implicit iterations per scale when sampling: none."""
        return [0] * num_scales

    def forward(self, x_BLC, cond_BD_or_gss, attn_bias, iters=None):
        for b in self.blocks:
            x_BLC = _maybe_checkpoint(self.grad_checkpointing, b, x_BLC, cond_BD_or_gss, attn_bias)
        return x_BLC

    # ---- sampling with KV caches ----
    def start_sampling(self, patch_nums: Sequence[int], schedule: Sequence[int]):
        L = sum(pn * pn for pn in patch_nums)
        for b in self.blocks:
            b.attn.kv_caching(True, capacity=L)

    def sample_scale(self, x_BlC, adas, si: int, schedule: Sequence[int], fp=None, trace=None, state=None):
        for b, ada in zip(self.blocks, adas):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        return x_BlC


class ImplicitBackbone(nn.Module):
    """VIAR: pre blocks -> implicit equilibrium block (with input-injection projection) -> post blocks.

    Iteration settings (the official attribute names): training draws n0 ~ U{no_grad min..max} steps without gradient
    and n1 ~ U{with_grad min..max} with gradient.  In eval mode a pinned range (min == max) is used as it is -- that is
    how users fix the counts, and it gives the official numbers -- while an unpinned one gives the deterministic
    n0 = 0, n1 = ``implicit_eval_iters`` (the official code draws at random in eval mode too).
    """

    is_implicit = True

    def __init__(self, make_block, depth: int, pre_depth: int, post_depth: int, embed_dim: int,
                 no_grad_iters=(0, 10), with_grad_iters=(1, 12), eval_iters: int = 10):
        super().__init__()
        if not (0 <= pre_depth <= depth and 0 <= post_depth <= depth):
            raise ValueError(f'VIAR needs 0 <= pre_depth, post_depth <= depth; '
                             f'got pre_depth={pre_depth}, post_depth={post_depth}, depth={depth}')
        # the pre/post/implicit blocks take the drop-path rates of the block positions they stand for
        # (registration order = the official state-dict order: projection, pre, implicit, post)
        self.implicit_block_projection = nn.Sequential(
            nn.Linear(2 * embed_dim, 2 * embed_dim), nn.GELU(approximate='tanh'), nn.Linear(2 * embed_dim, embed_dim))
        self.pre_blocks = nn.ModuleList([make_block(i) for i in range(pre_depth)])
        self.implicit_block = make_block(depth // 2, last_drop_idx=pre_depth - 1)
        self.post_blocks = nn.ModuleList([make_block(i) for i in range(depth - post_depth, depth)])
        self.implicit_no_grad_min_iters, self.implicit_no_grad_max_iters = no_grad_iters
        self.implicit_with_grad_min_iters, self.implicit_with_grad_max_iters = with_grad_iters
        self.implicit_eval_iters = eval_iters
        self.grad_checkpointing = False

    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return [*self.pre_blocks, self.implicit_block, *self.post_blocks]

    def draw_iters(self, rng: Optional[random.Random] = None) -> Tuple[int, int]:
        """(n0, n1) for one training step, uniform in the configured ranges, from ``rng`` (default: Python's global
        ``random``, as the official code)."""
        rng = rng or random
        return (rng.randint(self.implicit_no_grad_min_iters, self.implicit_no_grad_max_iters),
                rng.randint(self.implicit_with_grad_min_iters, self.implicit_with_grad_max_iters))

    def eval_iters(self) -> Tuple[int, int]:
        """(n0, n1) of an eval-mode forward: pinned ranges as they are, otherwise (0, ``implicit_eval_iters``)."""
        lo0, hi0 = self.implicit_no_grad_min_iters, self.implicit_no_grad_max_iters
        lo1, hi1 = self.implicit_with_grad_min_iters, self.implicit_with_grad_max_iters
        return (lo0 if lo0 == hi0 else 0), (lo1 if lo1 == hi1 else self.implicit_eval_iters)

    def schedule(self, iter_left: int, iter_right: int, num_scales: int) -> List[int]:
        """Implicit iterations per scale when sampling (each scale's maximum under an ``iter_tol``)."""
        return iterations_per_scale(iter_left, iter_right, num_scales)

    # ---- the fixed-point step ----
    def injection(self, u_BLC: torch.Tensor) -> torch.Tensor:
        """The input injection's share of the projection's first layer, ``W[:, C:] u + b``: fixed while iterating, so
        computed once (fp32 only; see ``project``)."""
        lin0 = self.implicit_block_projection[0]
        return F.linear(u_BLC, lin0.weight[:, u_BLC.shape[-1]:], lin0.bias)

    def project(self, z_BLC: torch.Tensor, u_BLC: torch.Tensor, inj_BLC: Optional[torch.Tensor]) -> torch.Tensor:
        """``proj([z ; u])``.  With ``inj_BLC = injection(u)`` (plain fp32) the first layer is
        ``W[:, :C] z + inj``: 1/3 fewer projection FLOPs and no (B, L, 2C) concatenation per step; it rounds
        differently from one GEMM on ``cat([z ; u])``, so under half-precision autocast the official form is used
        (same tokens as the official code)."""
        if inj_BLC is None:
            return self.implicit_block_projection(torch.cat((z_BLC, u_BLC), dim=-1))
        lin0, act, lin1 = self.implicit_block_projection
        return lin1(act(F.linear(z_BLC, lin0.weight[:, :z_BLC.shape[-1]]).add_(inj_BLC)))

    def implicit_step(self, z_BLC, u_BLC, inj_BLC, cond_BD_or_gss, attn_bias, cur_it=0, ada_B16C=None, rows=None):
        """One fixed-point step ``z <- implicit_block(proj([z ; u]))`` (``rows``: see ``KVCache.append``)."""
        z_BLC = self.project(z_BLC, u_BLC, inj_BLC)
        if rows is None:
            return self.implicit_block(z_BLC, cond_BD_or_gss, attn_bias, cur_it=cur_it, ada_B16C=ada_B16C)
        return self.implicit_block(z_BLC, cond_BD_or_gss, attn_bias, cur_it=cur_it, ada_B16C=ada_B16C, rows=rows)

    def _injection_if_exact(self, u_BLC: torch.Tensor) -> Optional[torch.Tensor]:
        exact = u_BLC.dtype == torch.float32 and not torch.is_autocast_enabled(u_BLC.device.type)
        return self.injection(u_BLC) if exact else None

    def forward(self, x_BLC, cond_BD_or_gss, attn_bias, iters: Optional[Tuple[int, int]] = None):
        """Teacher forcing.  ``iters=(n0, n1)``: n0 fixed-point steps without gradient (under ``no_grad``: no activation
        is kept, so memory does not grow with n0), then n1 steps with gradient into the implicit block, the projection
        and, through the injection u, the pre blocks.  Default: drawn (training) or ``eval_iters()`` (eval mode)."""
        ckpt = self.grad_checkpointing
        for b in self.pre_blocks:
            x_BLC = _maybe_checkpoint(ckpt, b, x_BLC, cond_BD_or_gss, attn_bias)
        if iters is None:
            iters = self.draw_iters() if self.training else self.eval_iters()
        n_no_grad, n_with_grad = iters
        u_BLC = x_BLC
        inj_BLC = self._injection_if_exact(u_BLC)      # with gradient into the projection and the pre blocks
        z_BLC = u_BLC.detach()
        if n_no_grad > 0:
            with torch.no_grad():
                inj_ng = None if inj_BLC is None else inj_BLC.detach()
                for it in range(n_no_grad):
                    z_BLC = self.implicit_step(z_BLC, u_BLC.detach(), inj_ng, cond_BD_or_gss, attn_bias, cur_it=it)
        for it in range(n_with_grad):
            z_BLC = _maybe_checkpoint(ckpt, self.implicit_step, z_BLC, u_BLC, inj_BLC, cond_BD_or_gss, attn_bias, it)
        x_BLC = z_BLC
        for b in self.post_blocks:
            x_BLC = _maybe_checkpoint(ckpt, b, x_BLC, cond_BD_or_gss, attn_bias)
        return x_BLC

    # ---- sampling with KV caches ----
    def start_sampling(self, patch_nums: Sequence[int], schedule: Sequence[int]):
        L = sum(pn * pn for pn in patch_nums)
        for b in (*self.pre_blocks, *self.post_blocks):
            b.attn.kv_caching(True, capacity=L)
        # iteration i at scale k attends to the keys of iteration i at the earlier scales that ran it
        capacity = {i: sum(pn * pn for pn, n in zip(patch_nums, schedule) if n > i)
                    for i in range(max(schedule, default=0))}
        self.implicit_block.attn.kv_caching(True, capacity=capacity)

    def sample_scale(self, x_BlC, adas, si: int, schedule: Sequence[int], fp: Optional[FixedPointOptions] = None,
                     trace: Optional[Dict[str, list]] = None, state: Optional[dict] = None):
        """Pre blocks, up to ``schedule[si]`` implicit iterations solved as ``fp`` says (default: the paper's fixed
        count of Picard steps from z_0 = u), post blocks, for the tokens of scale ``si``.

        Early exit (``fp.tol``): after iteration i >= 1, a row's relative residual is ``|f(x) - x| / |f(x)|`` (Picard:
        ``|z_i - z_(i-1)| / |z_i|``); 'batch' stops once every row is <= tol, 'row' stops each image once both its
        rows are.  ``trace``: a dict whose lists get this scale's residuals (over the rows still iterating, and per
        row: NaN once a row stopped) and iterations run (the most, and per image).  ``state``: a dict kept across
        the scales of one sampler call (the warm start reads the previous scale's fixed point from it).  Residuals
        are computed only when the tolerance or the trace asks for them."""
        fp = fp or FixedPointOptions()
        n_pre = len(self.pre_blocks)
        ada_pre, ada_imp, ada_post = adas[:n_pre], adas[n_pre], adas[n_pre + 1:]
        for b, ada in zip(self.pre_blocks, ada_pre):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        u_BlC, n = x_BlC, schedule[si]
        later_max = max(schedule[si + 1:], default=0)
        if n > 0:
            z0_BlC = u_BlC
            if fp.warm_start and state is not None and state.get('z') is not None:
                z0_BlC = upsample_tokens(state['z'], u_BlC.shape[1])
            z_BlC, ran_R = self._solve(z0_BlC, u_BlC, ada_imp, n, fp, trace)
            if fp.exit == 'row' and fp.tol is not None:
                self._fill_stopped_caches(ran_R, u_BlC.shape[1], min(n, later_max))
        else:
            z_BlC = u_BlC
            if trace is not None:
                self._trace(trace, 0, [], [], torch.zeros(u_BlC.shape[0], dtype=torch.long))
        if state is not None:
            state['z'] = z_BlC
        # free the caches of iteration indices no later scale runs
        for it in range(later_max, n):
            self.implicit_block.attn.free_cache(it)
        x_BlC = z_BlC
        for b, ada in zip(self.post_blocks, ada_post):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        return x_BlC

    @staticmethod
    def _trace(trace, ran: int, res_all: list, res_rows: list, ran_R: torch.Tensor) -> None:
        R = ran_R.shape[0]
        trace['iters'].append(ran)
        trace['residual'].append(torch.stack(res_all).tolist() if res_all else [])
        trace['residual_rows'].append(torch.stack(res_rows).cpu() if res_rows else torch.zeros(0, R))
        trace['iters_per_image'].append(torch.maximum(ran_R[:R // 2], ran_R[R // 2:]).tolist())

    def _solve(self, x_BlC, u_BlC, ada_imp, n: int, fp: FixedPointOptions, trace):
        """Up to ``n`` (>= 1) iterations from ``x_BlC``; returns (the last evaluation f(x) of every row, the
        iterations each row ran (R,)).  Under 'row' exit the active rows are gathered (``idx``: their indices, None
        while all are active) and every tensor of the iteration narrowed to them; no masked row is computed."""
        R = u_BlC.shape[0]
        inj_BlC = self._injection_if_exact(u_BlC)
        measure = fp.tol is not None or trace is not None
        row_exit = fp.exit == 'row' and fp.tol is not None
        u, inj, ada, idx, hist = u_BlC, inj_BlC, ada_imp, None, None
        ran_R = torch.full((R,), n, dtype=torch.long, device=u_BlC.device)
        out_BlC = None          # the outputs of the rows that stopped ('row' exit)
        res_all, res_rows, ran = [], [], 0
        for it in range(n):
            g_BlC = self.implicit_step(x_BlC, u, inj, None, None, cur_it=it, ada_B16C=ada,
                                       rows=None if idx is None else (idx, R))
            ran = it + 1
            if measure:     # per-row norms in fp32; the whole batch's from them, for the trace only (no sync)
                g_f = g_BlC.float()
                d_rows, n_rows = (g_f - x_BlC.float()).flatten(1).norm(dim=1), g_f.flatten(1).norm(dim=1)
                r_rows = d_rows / n_rows.clamp_min(1e-30)
                if trace is not None:
                    res_all.append(d_rows.square().sum().sqrt() / n_rows.square().sum().sqrt().clamp_min(1e-30))
                    res_rows.append(r_rows if idx is None else
                                    r_rows.new_full((R,), math.nan).index_copy_(0, idx, r_rows))
            if fp.solver == 'anderson':
                x_next, hist = anderson_step(hist, x_BlC, g_BlC, fp.anderson_m, fp.anderson_beta)
            else:
                x_next = g_BlC
            if fp.tol is not None and not row_exit:
                if r_rows.max().item() <= fp.tol:
                    ran_R.fill_(ran)
                    break
            elif row_exit:
                half = r_rows.shape[0] // 2         # active rows: conditional ones, then their unconditional ones
                done = torch.maximum(r_rows[:half], r_rows[half:]) <= fp.tol
                if done.any().item():
                    done2 = torch.cat((done, done))
                    act = torch.arange(R, device=u_BlC.device) if idx is None else idx
                    stopped = act[done2]
                    if out_BlC is None:
                        out_BlC = torch.empty_like(g_BlC)
                    out_BlC[stopped] = g_BlC[done2]
                    ran_R[stopped] = ran
                    keep2 = ~done2
                    idx, g_BlC, x_next, u = act[keep2], g_BlC[keep2], x_next[keep2], u[keep2]
                    inj = None if inj is None else inj[keep2]
                    ada = ada[keep2]
                    hist = None if hist is None else (hist[0][keep2], hist[1][keep2])
                    if idx.numel() == 0:
                        break
            x_BlC = x_next
        if out_BlC is None:
            out_BlC = g_BlC
        elif idx.numel():
            out_BlC[idx] = g_BlC
        if trace is not None:
            self._trace(trace, ran if not row_exit else int(ran_R.max()), res_all, res_rows, ran_R)
        return out_BlC, ran_R

    def _fill_stopped_caches(self, ran_R: torch.Tensor, l: int, upto: int) -> None:
        """'row' exit: a row that ran i iterations of this scale gets, in the caches of the iteration indices
        i .. upto-1, the keys and values of its last iteration (index i-1) for this scale's l tokens: a later scale
        iterating further reads a converged state.  Every row ran iteration 0."""
        attn, max_ran = self.implicit_block.attn, int(ran_R.max())
        for j in range(1, upto):
            src_k, src_v = attn.kv_caches[j - 1].last_slot(l)
            if j < max_ran:     # some rows ran iteration j: fill those that did not
                lag = (ran_R <= j).nonzero()[:, 0]
                if lag.numel():
                    dst_k, dst_v = attn.kv_caches[j].last_slot(l)
                    dst_k[lag], dst_v[lag] = src_k[lag], src_v[lag]
            else:               # no row ran it: the whole slot
                attn.cache(j).append(src_k, src_v)


# ============================================== published keys ========================================================
BACKBONE = 'backbone.'


def published_key(name: str) -> str:
    """The published name of a parameter or buffer of a VAR/VIAR/FlexVAR model (``named_parameters()`` name ->
    state-dict key): ``backbone.blocks.0.attn.proj.weight`` -> ``blocks.0.attn.proj.weight``; other names unchanged."""
    return name[len(BACKBONE):] if name.startswith(BACKBONE) else name


def _to_published_keys(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: ``<prefix>backbone.X`` -> ``<prefix>X`` in place, order kept (and in ``_metadata``)."""
    inner = prefix + BACKBONE
    items = [(prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)
    meta = getattr(state_dict, '_metadata', None)
    if meta is not None:
        entries = [(prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in meta.items()
                   if k != inner[:-1]]
        meta.clear()
        meta.update(entries)


def _from_published_keys(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the published ``<prefix>X`` of a backbone module -> ``<prefix>backbone.X``."""
    heads = tuple(prefix + name + '.' for name in module.backbone._modules)
    for k in [k for k in state_dict if k.startswith(heads)]:
        state_dict[prefix + BACKBONE + k[len(prefix):]] = state_dict.pop(k)


def _published_incompatible_keys(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: missing / unexpected keys (and so torch's error message) under published names."""
    for keys in incompatible_keys:
        keys[:] = [k.replace('.' + BACKBONE, '.', 1) if ('.' + BACKBONE) in k else published_key(k) for k in keys]


# ============================================== VAR ===================================================================
class VAR(nn.Module):
    inference_dtype: Optional[torch.dtype] = None      # set by ``cast_for_inference``

    def __init__(
        self, vae_local, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
        attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), flash_if_available=True,
        fused_if_available=True,
        # VIAR
        use_implicit=False, pre_depth=5, post_depth=5,
        implicit_no_grad_min_iters=0, implicit_no_grad_max_iters=10,
        implicit_with_grad_min_iters=1, implicit_with_grad_max_iters=12,
    ):
        super().__init__()
        # 0. hyper-parameters
        assert embed_dim % num_heads == 0
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.use_implicit, self.pre_depth, self.post_depth = use_implicit, pre_depth, post_depth
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums: Tuple[int, ...] = tuple(patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends, cur = [], 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self._rngs: Dict[str, torch.Generator] = {}     # one sampling generator per device

        # 1. input (word) embedding; the tokenizer is held by reference, not as a sub-module (not in state_dict)
        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)
        self.word_embed = nn.Linear(self.Cvae, self.C)

        # 2. class embedding (the last row is the unconditional class) and start token position
        init_std = math.sqrt(1 / self.C / 3)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        for p in (self.class_emb.weight, self.pos_start):
            if not p.is_meta:
                nn.init.trunc_normal_(p.data, mean=0, std=init_std)

        # 3. positions of the tokens of every scale (scale paradigm)
        self.build_positions(init_std)

        # 4. backbone
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
                               if shared_aln else nn.Identity())
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.drop_path_rate = drop_path_rate
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]

        def make_block(block_idx: int, last_drop_idx: Optional[int] = None) -> AdaLNSelfAttn:
            last_idx = block_idx - 1 if last_drop_idx is None else last_drop_idx
            return AdaLNSelfAttn(
                cond_dim=self.D, shared_aln=shared_aln, block_idx=block_idx, embed_dim=self.C, norm_layer=norm_layer,
                num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[block_idx], last_drop_p=dpr[last_idx] if last_idx >= 0 else 0,
                attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available)

        if use_implicit:
            backbone = ImplicitBackbone(
                make_block, depth, pre_depth, post_depth, self.C,
                no_grad_iters=(implicit_no_grad_min_iters, implicit_no_grad_max_iters),
                with_grad_iters=(implicit_with_grad_min_iters, implicit_with_grad_max_iters))
        else:
            backbone = ExplicitBackbone(make_block, depth)
        self.backbone = backbone        # registered here: parameter order = the published state-dict order
        self.register_state_dict_post_hook(_to_published_keys)
        self.register_load_state_dict_pre_hook(_from_published_keys)
        self.register_load_state_dict_post_hook(_published_incompatible_keys)

        # 5. classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    # ---- the backbone's blocks and VIAR's iteration attributes under their official names: see the properties below
    def __getattr__(self, name):
        if name in IMPLICIT_ATTRS:      # its property found no implicit backbone: say so (nn.Module's text would not)
            self._implicit_backbone(name)
        return super().__getattr__(name)

    def _implicit_backbone(self, name: str) -> 'ImplicitBackbone':
        if not self.backbone.is_implicit:
            raise AttributeError(f'{name}: this {type(self).__name__} has no implicit block (built with '
                                 f'use_implicit=False); the iteration settings exist only for VIAR models')
        return self.backbone

    def _backbone_module(name: str):
        def get(self):
            module = self.backbone._modules.get(name)
            if module is None:
                raise AttributeError(f'{name}: this {type(self).__name__} has no such backbone part '
                                     f'({"VIAR" if self.backbone.is_implicit else "VAR"} backbone)')
            return module
        return property(get, doc=f'``backbone.{name}`` (official attribute name)')

    def _iteration_attr(name: str):
        return property(lambda self: getattr(self._implicit_backbone(name), name),
                        lambda self, value: setattr(self._implicit_backbone(name), name, int(value)),
                        doc=f'``backbone.{name}`` (VIAR only; official attribute name)')

    blocks, implicit_block_projection, pre_blocks, implicit_block, post_blocks = map(
        _backbone_module, ('blocks', 'implicit_block_projection', 'pre_blocks', 'implicit_block', 'post_blocks'))
    (implicit_no_grad_min_iters, implicit_no_grad_max_iters, implicit_with_grad_min_iters,
     implicit_with_grad_max_iters, implicit_eval_iters) = map(_iteration_attr, IMPLICIT_ATTRS)
    del _backbone_module, _iteration_attr

    # ---- scale paradigm: positions, the next scale's input, decoding -------------------------------------------------
    def build_positions(self, init_std: float):
        """Learnt absolute position of each of the L tokens (``pos_1LC``) plus a level (scale) embedding, and the
        block-causal mask of the scales (buffers ``lvl_1L``, ``attn_bias_for_masking`` of the published checkpoints)."""
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        for p in (self.pos_1LC, self.lvl_embed.weight):
            if not p.is_meta:
                nn.init.trunc_normal_(p.data, mean=0, std=init_std)
        lvl_1L, attn_bias = block_causal_mask(self.patch_nums)
        self.register_buffer('lvl_1L', lvl_1L)
        self.register_buffer('attn_bias_for_masking', attn_bias.contiguous())

    def _check_patch_nums(self, patch_nums: Sequence[int]) -> Tuple[int, ...]:
        patch_nums = tuple(patch_nums)
        if patch_nums != self.patch_nums:
            raise ValueError(f'this VAR was built for the scales {self.patch_nums} and cannot use {patch_nums} '
                             f'(only FlexVAR models take any schedule)')
        return patch_nums

    def positions(self, patch_nums: Sequence[int]) -> torch.Tensor:
        """Position (+ level) embedding of every token of the schedule, (1, L, C)."""
        self._check_patch_nums(patch_nums)
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def attn_mask(self, patch_nums: Sequence[int]) -> torch.Tensor:
        self._check_patch_nums(patch_nums)
        return self.attn_bias_for_masking

    def code_book(self) -> torch.Tensor:
        """(V, Cvae) code vectors the drawn token indices stand for."""
        return self.vae_quant_proxy[0].embedding.weight

    def new_canvas(self, B: int, patch_nums: Sequence[int], like: torch.Tensor):
        """What sampling accumulates across scales: VAR's ``f_hat`` (B, Cvae, H, W) in the dtype of ``like``."""
        pn = patch_nums[-1]
        return like.new_zeros(B, self.Cvae, pn, pn)

    def advance(self, si: int, patch_nums: Sequence[int], canvas, h_BChw: torch.Tensor):
        """Adds scale ``si``'s codes; returns (canvas, next scale's input map (B, Cvae, pn', pn') or None at the
        end)."""
        canvas, next_BChw = self.vae_quant_proxy[0].get_next_autoregressive_input(si, len(patch_nums), canvas, h_BChw)
        return canvas, (next_BChw if si < len(patch_nums) - 1 else None)

    def decode(self, canvas) -> torch.Tensor:
        """Image in [-1, 1] from the canvas."""
        return self.vae_proxy[0].fhat_to_img(canvas)

    def guidance(self, si: int, pn: int, patch_nums: Sequence[int], cfg: float, logits_BlV: torch.Tensor,
                 B: int, **kw) -> torch.Tensor:
        """Classifier-free guidance, ramped linearly over the scales: (1 + t) cond - t uncond, t = cfg k / (K - 1)."""
        t = cfg * si / max(len(patch_nums) - 1, 1)
        return (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]

    def top_k_at(self, si: int, pn: int, top_k: int, **kw) -> int:
        return top_k

    # ------------------------------------------------------------------------------------------------------------------
    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return self.backbone.all_blocks()

    def set_grad_checkpointing(self, enable: bool = True) -> 'VAR':
        """Activation checkpointing of every block and of every implicit step with gradient (``torch.utils.checkpoint``,
        non-reentrant): the activations are recomputed in backward, gradients are unchanged."""
        self.backbone.grad_checkpointing = bool(enable)
        return self

    def describe(self) -> str:
        if self.backbone.is_implicit:
            return (f'{self.family}-d{self.depth} ({self.pre_depth} pre + 1 implicit + {self.post_depth} post '
                    f'blocks)')
        return f'{self.family}-d{self.depth}'

    @property
    def family(self) -> str:
        return 'VIAR' if self.backbone.is_implicit else 'VAR'

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: Optional[torch.Tensor]) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def _rng(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._rngs:
            self._rngs[key] = torch.Generator(device=device)
        return self._rngs[key]

    # ================================ teacher forcing =================================================================
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor,
                iters: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits (B, L, V) of every token given the ground-truth earlier scales.

        :param label_B: class labels (B,); replaced by the unconditional class with probability cond_drop_rate
        :param x_BLCv_wo_first_l: teacher-forcing input (B, L - first_l, Cvae), from ``idxBl_to_var_input``
        :param iters: VIAR only: (n0, n1) fixed-point steps without / with gradient (default: see ImplicitBackbone)
        """
        return self.teacher_forcing(label_B, x_BLCv_wo_first_l, self.patch_nums, iters)

    def teacher_forcing(self, label_B, x_BLCv_wo_first_l, patch_nums, iters=None) -> torch.Tensor:
        if self.inference_dtype is not None:
            raise RuntimeError(f'this model was cast to {self.inference_dtype} for inference (cast_for_inference); '
                               f'teacher forcing and training need the fp32 weights: reload them')
        B = x_BLCv_wo_first_l.shape[0]
        dev_type = x_BLCv_wo_first_l.device.type
        with torch.autocast(device_type=dev_type, enabled=False):
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + self.positions(patch_nums)
        attn_bias = self.attn_mask(patch_nums)
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        # under autocast, run the backbone in the autocast dtype
        main_type = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else x_BLC.dtype
        x_BLC, cond_BD_or_gss, attn_bias = x_BLC.to(main_type), cond_BD_or_gss.to(main_type), attn_bias.to(main_type)
        x_BLC = self.backbone(x_BLC, cond_BD_or_gss, attn_bias, iters=iters)
        return self.get_logits(x_BLC.float(), cond_BD)

    # ================================ sampling ========================================================================
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed: Optional[int] = None, cfg=1.5,
        top_k=0, top_p=0.0, more_smooth=False, iter_left=10, iter_right=10, ret_idx_Bl: bool = False,
        input_img_tokens: Optional[List[torch.Tensor]] = None, edit_mask: Optional[torch.Tensor] = None,
        iter_tol: Optional[float] = None, trace: Optional[Dict[str, list]] = None, iter_exit: str = 'batch',
        iter_solver: str = 'picard', anderson_m: int = 5, anderson_beta: float = 1.0, warm_start: bool = False,
    ):
        """Class-conditional generation with classifier-free guidance; returns images (B, 3, H, W) in [0, 1].

        :param label_B: class labels (B,); None: uniform random classes drawn with the seeded generator;
                        an int: that class for all (negative: unconditional)
        :param g_seed: seed of the sampling generator (None: the global RNG), or a list of B seeds: image b is drawn
                       from its own generator, so it does not depend on the batch it is sampled in
        :param cfg: guidance; at scale k the logits are (1 + t) cond - t uncond with t = cfg * k / (K - 1)
        :param top_k, top_p: filtering before the multinomial draw (0: off; top_k > V keeps every token)
        :param more_smooth: gumbel-softmax mixture of codes (visualisation only, not for FID)
        :param iter_left, iter_right: VIAR only: implicit iterations at the first / last scale, linear in between
        :param ret_idx_Bl: also return the token map of every scale (list of (B, pn*pn)), after any teacher forcing
        :param input_img_tokens, edit_mask: zero-shot editing: the tokens of the image to edit (``vae.img_to_idxBl``)
                        and a mask (h, w) or (B, h, w), 1 = keep the image's token, 0 = generate (``get_edit_mask``)
        :param iter_tol: VIAR only: early exit once the relative residual is <= iter_tol (see ``iter_exit``)
        :param trace: a dict filled with the fixed-point trace: per scale the iterations run (``iters``; the most of
                      any image), per image (``iters_per_image``: B ints), the relative residual of each iteration
                      over the rows still iterating (``residual``) and per row (``residual_rows``: (iterations, 2B)
                      tensors, conditional rows first, NaN after a row stopped)
        :param iter_exit: VIAR only: 'batch' (a scale stops once every row is below iter_tol) or 'row' (each image
                      stops on its own; the others iterate on)
        :param iter_solver, anderson_m, anderson_beta: VIAR only: 'picard' (z <- f(z)) or 'anderson' (Anderson
                      acceleration with memory anderson_m and damping anderson_beta)
        :param warm_start: VIAR only: each scale starts from the previous scale's fixed point (upsampled), not u
        """
        with self.inference_autocast():
            return self._sample(
                B, label_B, patch_nums=self.patch_nums, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                more_smooth=more_smooth, iter_left=iter_left, iter_right=iter_right, ret_idx_Bl=ret_idx_Bl,
                input_img_tokens=input_img_tokens, edit_mask=edit_mask, trace=trace,
                fp=FixedPointOptions(iter_tol, iter_exit, iter_solver, anderson_m, anderson_beta, bool(warm_start)))

    def _sampling_rng(self, g_seed, B: int, dev: torch.device):
        """None (the global RNG), this model's generator of ``dev`` seeded with the int ``g_seed`` (the official
        behaviour), or for a list of B seeds one fresh generator per image."""
        if g_seed is None:
            return None
        if isinstance(g_seed, (list, tuple)) or (torch.is_tensor(g_seed) and g_seed.ndim == 1):
            seeds = [int(s) for s in g_seed]
            if len(seeds) != B:
                raise ValueError(f'g_seed has {len(seeds)} seeds for B={B} (one per image, or one int)')
            return [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        return self._rng(dev).manual_seed(g_seed)

    def _sample(self, B: int, label_B, *, patch_nums: Sequence[int], g_seed, cfg: float, top_k: int, top_p: float,
                more_smooth: bool, iter_left: int, iter_right: int, ret_idx_Bl: bool, input_img_tokens, edit_mask,
                fp: FixedPointOptions, trace: Optional[Dict[str, list]], **paradigm_kw):
        """The sampler of every family (``autoregressive_infer_cfg``, ``FlexVAR.sample``; run under
        ``inference_autocast``); ``paradigm_kw`` go to the scale paradigm's ``guidance`` and ``top_k_at``."""
        dev = self.class_emb.weight.device
        rng = self._sampling_rng(g_seed, B, dev)
        if label_B is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32, device=dev)
            if isinstance(rng, list):
                label_B = torch.cat([torch.multinomial(uniform, num_samples=1, replacement=True, generator=g).reshape(1)
                                     for g in rng])
            else:
                label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=dev)
        label_B = label_B.to(dev)
        if label_B.numel() != B:
            raise ValueError(f'label_B has {label_B.numel()} labels for B={B}')
        if (input_img_tokens is None) != (edit_mask is None):
            raise ValueError('zero-shot editing needs both input_img_tokens and edit_mask')
        top_k = min(top_k, self.V) if top_k > 0 else top_k       # top-k above the vocabulary keeps every token
        if trace is not None:
            trace.update(iters=[], iters_per_image=[], residual=[], residual_rows=[])

        K = len(patch_nums)
        schedule = self.backbone.schedule(iter_left, iter_right, K)
        codes_VC = self.code_book()
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes)), dim=0))
        pos_1LC = self.positions(patch_nums)
        next_token_map = (sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
                          + self.pos_start.expand(2 * B, self.first_l, -1) + pos_1LC[:, :self.first_l])
        canvas = self.new_canvas(B, patch_nums, sos)
        # the class condition is the same at every scale: modulation vectors computed once per block
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        adas = [b.ada(cond_BD_or_gss) for b in self.all_blocks()]
        idx_Bl_per_scale = []

        self.backbone.start_sampling(patch_nums, schedule)
        state = {}      # what the backbone keeps from one scale to the next (the warm start's fixed point)
        try:
            cur_L = 0
            for si, pn in enumerate(patch_nums):
                ratio = si / max(K - 1, 1)
                cur_L += pn * pn
                x_BlC = self.backbone.sample_scale(next_token_map, adas, si, schedule, fp, trace, state)
                logits_BlV = self.get_logits(x_BlC, cond_BD)
                logits_BlV = self.guidance(si, pn, patch_nums, cfg, logits_BlV, B, **paradigm_kw)
                k_si = self.top_k_at(si, pn, top_k, **paradigm_kw)
                idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=k_si, top_p=top_p, num_samples=1)[:, :, 0]
                if not more_smooth:
                    h_BlC = F.embedding(idx_Bl, codes_VC)
                else:   # visualisation only
                    gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                    h_BlC = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=gum_t, hard=False, dim=-1, rng=rng) \
                        @ codes_VC.unsqueeze(0)
                if edit_mask is not None:       # zero-shot editing: the kept positions get the input image's codes
                    keep_Bl1 = _keep_map(edit_mask.to(dev), B, pn)
                    gt_Bl = input_img_tokens[si].to(dev)
                    # promoted as the notebook's gt * m + h * (1 - m): exact fp32 codes even where more_smooth's
                    # mixture came out of an autocast matmul in half precision
                    h_BlC = torch.where(keep_Bl1, F.embedding(gt_Bl, codes_VC), h_BlC)
                    idx_Bl = torch.where(keep_Bl1[..., 0], gt_Bl, idx_Bl)
                idx_Bl_per_scale.append(idx_Bl)
                h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                canvas, next_BChw = self.advance(si, patch_nums, canvas, h_BChw)
                if next_BChw is not None:
                    next_token_map = next_BChw.view(B, self.Cvae, -1).transpose(1, 2)
                    next_token_map = self.word_embed(next_token_map) + pos_1LC[:, cur_L:cur_L + patch_nums[si + 1] ** 2]
                    next_token_map = next_token_map.repeat(2, 1, 1)     # conditional rows, then unconditional
        finally:
            self.kv_caching(False)
        img = self.decode(canvas).add_(1).mul_(0.5)
        return (img, idx_Bl_per_scale) if ret_idx_Bl else img

    # ================================ half-precision inference ========================================================
    def cast_for_inference(self, dtype: torch.dtype = torch.bfloat16) -> 'VAR':
        """Casts the weight and bias of every ``nn.Linear`` and the attention's q/k/v biases to ``dtype`` (bf16 or
        fp16) once, for sampling under autocast of that dtype.  Autocast casts exactly these tensors to ``dtype`` at
        every call of a linear layer (its weight cache is off under ``inference_mode``); cast beforehand they pass
        through unchanged, so the images are bit-identical to plain autocast.  Everything autocast leaves in fp32
        stays fp32: embeddings, positions, ``ada_gss``, ``scale_mul_1H11``, masks.  From then on
        ``autoregressive_infer_cfg`` runs under autocast of ``dtype`` by itself; teacher forcing (training) needs
        the fp32 weights again (reload them).  Returns ``self``."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f'cast_for_inference takes torch.bfloat16 or torch.float16, got {dtype}')
        if self.inference_dtype not in (None, dtype):
            raise ValueError(f'this model was already cast to {self.inference_dtype}; reload it to use {dtype}')
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.to(dtype)
            for b in self.all_blocks():
                attn = b.attn
                for name in ('q_bias', 'v_bias'):
                    getattr(attn, name).data = getattr(attn, name).data.to(dtype)
                attn.zero_k_bias = attn.zero_k_bias.to(dtype)
        self.inference_dtype = dtype
        return self

    def inference_autocast(self):
        """The autocast a model cast by ``cast_for_inference`` samples under (a no-op context otherwise); autocast
        already on in another half-precision dtype is refused (the weights would be rounded twice)."""
        dtype = self.inference_dtype
        dev_type = self.class_emb.weight.device.type
        if dtype is None:
            return nullcontext()
        if torch.is_autocast_enabled(dev_type) and torch.get_autocast_dtype(dev_type) != dtype:
            raise ValueError(f'the model was cast to {dtype} for inference but autocast runs in '
                             f'{torch.get_autocast_dtype(dev_type)}; use autocast({dtype}) or reload the weights')
        return torch.autocast(dev_type, dtype=dtype)

    def compile_blocks(self, **compile_kwargs) -> 'VAR':
        """Optional ``torch.compile`` of every block's two tensor-only halves (``attn_in``: LayerNorm, modulation,
        qkv, l2-norm; ``attn_out_ffn``: projection, residuals, FFN).  The attention kernel and the KV cache stay
        eager between them, so sampling and teacher forcing keep their exact control flow.  Off by default; shapes
        change at every scale, hence ``dynamic=True``.  The state dict is unchanged (the compiled functions are
        instance attributes, not modules).  Needs a C++ compiler on CPU (inductor)."""
        compile_kwargs.setdefault('dynamic', True)
        for b in self.all_blocks():
            b.attn_in = torch.compile(b.attn_in, **compile_kwargs)
            b.attn_out_ffn = torch.compile(b.attn_out_ffn, **compile_kwargs)
        return self

    def kv_caching(self, enable: bool):
        for b in self.all_blocks():
            b.attn.kv_caching(enable, capacity=self.L if enable else None)

    def kv_cache_nbytes(self) -> int:
        return sum(b.attn.cache_nbytes() for b in self.all_blocks())

    # ================================ initialisation ==================================================================
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=0.02, conv_std_or_gain=0.02):
        """Fresh-training initialisation: trunc-normal everywhere, head x init_head, AdaLN gamma rows x
        init_adaln_gamma and the other rows x init_adaln, attention ``proj`` and ``fc2`` / sqrt(2 depth) (the
        nominal depth, also for VIAR)."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.data.fill_(1.0)
                if m.bias is not None:
                    m.bias.data.zero_()
        self.init_positions()
        for blk in self.all_blocks():
            attn = blk.attn
            attn.q_bias.data.zero_()
            attn.v_bias.data.zero_()
            attn.zero_k_bias.zero_()
            if attn.attn_l2_norm:
                attn.scale_mul_1H11.data.fill_(math.log(4.0))
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for blk in self.all_blocks():
            blk.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if blk.shared_aln:
                blk.ada_gss.data.normal_().div_(self.C ** 0.5)
                blk.ada_gss.data[:, :, 2:].mul_(init_adaln)
                blk.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                blk.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                blk.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                blk.ada_lin[-1].bias.data.zero_()

    def init_positions(self):
        """(scale paradigm) Fresh positions and the mask buffers (``to_empty`` leaves buffers uninitialised)."""
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p.data, mean=0, std=math.sqrt(1 / self.C / 3))
        lvl_1L, attn_bias = block_causal_mask(self.patch_nums)
        self.lvl_1L.copy_(lvl_1L)
        self.attn_bias_for_masking.copy_(attn_bias)

    def extra_repr(self):
        return f'{self.describe()}, drop_path_rate={self.drop_path_rate:g}'
