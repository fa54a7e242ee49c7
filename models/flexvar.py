"""FlexVAR: next-scale prediction without residuals, for any schedule of scales (github jiaosiyu1999/FlexVAR).

``FlexVAR`` is ``VAR`` with another **scale paradigm** (it overrides only the methods ``VAR`` marks so); the backbone
stays ``VAR``'s independent choice, so ``use_implicit=True`` gives an implicit FlexVAR (flexible steps and VIAR's
per-scale iteration knob) by construction.  What changes:

* each scale predicts the ground-truth token map of that scale (``FlexVAE``: the image features area-resized to
  pn x pn, l2-normalised codebook), not a residual;
* the input of scale k+1 is scale k's normalised codes bicubic-resized to its side (``advance``); the image is the
  decoder of the last scale's codes (``decode``);
* positions: a learnt grid ``pos_1LC`` (1, C, 32, 32), area-resized to each scale's side; no level embedding;
* the block-causal mask is built for the schedule at hand (the stored ``attn_bias_for_masking`` is rebuilt on load);
* sampling: guidance ramps with ``si / min(K - 1, 9)`` (VAR's rule, or LlamaGen's ``u + (c - u) cfg``), scales
  larger than ``max_pn`` use the full ``cfg`` and, like sides FlexVAR was not trained on, greedy top-1 draws.
A schedule is a strictly increasing tuple of token-map sides starting at 1, e.g. ``(1, 2, 4, 8, 16)``; docs/families.md.
"""
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flexvae import FLEX_PATCH_NUMS
from .var import VAR, FixedPointOptions, block_causal_mask

__all__ = ['FlexVAR', 'sincos_grid', 'flex_train_schedule', 'flex_train_schedule_for', 'FLEX_TOPK_SIDES',
           'FLEX_MAX_TOKENS']

# sides FlexVAR samples with the user's top-k; any other side (or one above max_pn) is drawn greedily (top-1)
FLEX_TOPK_SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)
FLEX_MAX_TOKENS = 680       # token budget of a training schedule (= the default 10 scales)


def sincos_grid(C: int, side: int = 32) -> torch.Tensor:
    """FlexVAR's position grid at initialisation, (1, C, side, side): channel 2i is sin(y w_i), channel 2i+1 is
    cos(x w_i), with w_i = 10000^(-2i/C) (y: row, x: column)."""
    if C % 2:
        raise ValueError(f'the position grid needs an even width, got C={C}')
    w = torch.exp(torch.arange(0, C, 2, dtype=torch.float32) * -(math.log(10000.0) / C))     # C/2
    coords = torch.arange(side, dtype=torch.float32)
    grid = torch.empty(C, side, side)
    grid[0::2] = torch.sin(coords.view(1, side, 1) * w.view(-1, 1, 1)).expand(-1, side, side)   # rows: y
    grid[1::2] = torch.cos(coords.view(1, 1, side) * w.view(-1, 1, 1)).expand(-1, side, side)   # columns: x
    return grid.unsqueeze(0)


def flex_train_schedule(rng: random.Random, max_tokens: int = FLEX_MAX_TOKENS) -> List[int]:
    """The schedule of one FlexVAR training step, drawn from ``rng`` (the official trainer's rule and call order):

    * with probability 5 % the default scales 1 2 3 4 5 6 8 10 13 16, otherwise [1, 2] + 5 distinct sides from
      3..10 + 2 distinct sides from 11..15 (sorted) + [16];
    * x ~ U[0, 1): for each of 0.9, 0.95, 0.98, 0.99 that x exceeds, one scale (neither of the first two nor the last)
      is dropped at random;
    * while the schedule has more than ``max_tokens`` tokens, one of its last four scales is dropped at random.

    The result is strictly increasing, starts with 1 and holds at most ``max_tokens`` tokens (the budget drops may,
    rarely, remove the 2 or the 16)."""
    if rng.random() < 0.05:
        pns = list(FLEX_PATCH_NUMS)
    else:
        pns = [1, 2] + sorted(rng.sample(range(3, 11), 5) + rng.sample(range(11, 16), 2)) + [16]
    x = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if x > threshold:
            pns.pop(rng.choice(range(2, len(pns) - 1)))
    while sum(pn * pn for pn in pns) > max_tokens:
        pns.pop(rng.choice(range(len(pns) - 4, len(pns))))
    return pns



def flex_train_schedule_for(rng: random.Random, patch_nums: Sequence[int] = FLEX_PATCH_NUMS) -> List[int]:
    """The schedule of one training step for the training scales ``patch_nums`` (``train.py --flex --pn``).

    At the official scales (1 2 3 4 5 6 8 10 13 16) this is exactly ``flex_train_schedule(rng)``.  At other scales
    (e.g. a small model at 1 2 3 4), the same rule carried over: with probability 5 % ``patch_nums`` itself,
    otherwise its first two sides + ``len(patch_nums) - 3`` distinct sides drawn from those strictly between its
    second and last side (sorted) + its last side; the same scale drops (x ~ U[0, 1) past 0.9, 0.95, 0.98, 0.99,
    never the first two nor the last); then, while the schedule has more tokens than ``patch_nums``, one of its last
    four scales but the first two is dropped.  The result is strictly increasing, starts with ``patch_nums[0]``, holds
    at most as many tokens as ``patch_nums``.  Fewer than three scales: ``patch_nums`` every step."""
    pns = [int(pn) for pn in patch_nums]
    if tuple(pns) == tuple(FLEX_PATCH_NUMS):
        return flex_train_schedule(rng)
    if len(pns) < 3:
        return pns
    budget = sum(pn * pn for pn in pns)
    if rng.random() < 0.05:
        out = list(pns)
    else:
        middle = range(pns[1] + 1, pns[-1])
        out = pns[:2] + sorted(rng.sample(middle, min(len(pns) - 3, len(middle)))) + pns[-1:]
    x = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if x > threshold and len(out) > 3:
            out.pop(rng.choice(range(2, len(out) - 1)))
    while sum(pn * pn for pn in out) > budget and len(out) > 2:
        out.pop(rng.choice(range(max(2, len(out) - 4), len(out))))
    return out

class FlexVAR(VAR):
    """``VAR`` with FlexVAR's scale paradigm.  ``patch_nums`` is the default schedule (training's default scales and
    the size of the stored ``attn_bias_for_masking``); every method that takes a schedule accepts any other."""

    def __init__(self, vae_local, *var_args, pos_grid: int = 32, **var_kwargs):
        self.pos_grid = pos_grid            # side of the position grid; read by build_positions (VAR.__init__ calls it)
        super().__init__(vae_local, *var_args, **var_kwargs)

    @property
    def family(self) -> str:
        return 'FlexVIAR' if self.backbone.is_implicit else 'FlexVAR'

    # ---- scale paradigm ----------------------------------------------------------------------------------------------
    def build_positions(self, init_std: float):
        """The (1, C, grid, grid) position grid (sinusoid init) and the mask buffer of the default schedule (kept for
        the published layout; ``attn_mask`` builds the one of any other schedule)."""
        self.pos_1LC = nn.Parameter(torch.empty(1, self.C, self.pos_grid, self.pos_grid))
        if not self.pos_1LC.is_meta:
            self.pos_1LC.data.copy_(sincos_grid(self.C, self.pos_grid))
        self.register_buffer('attn_bias_for_masking', block_causal_mask(self.patch_nums)[1].contiguous())

    def init_positions(self):
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=math.sqrt(1 / self.C / 3))
        self.pos_1LC.data.copy_(sincos_grid(self.C, self.pos_grid))
        self.attn_bias_for_masking.copy_(block_causal_mask(self.patch_nums)[1])

    def check_schedule(self, patch_nums: Optional[Sequence[int]]) -> Tuple[int, ...]:
        """``patch_nums`` as a tuple (None: the default schedule); a clear ValueError if it is not a schedule."""
        if patch_nums is None:
            return self.patch_nums
        pns = tuple(int(pn) for pn in patch_nums)
        if not pns or pns[0] != self.patch_nums[0] or any(b <= a for a, b in zip(pns, pns[1:])):
            raise ValueError(f'a FlexVAR schedule is a strictly increasing list of token-map sides starting with '
                             f'{self.patch_nums[0]} (e.g. 1_2_4_8_16), got {"_".join(map(str, pns)) or "nothing"}')
        return pns

    def positions(self, patch_nums: Sequence[int]) -> torch.Tensor:
        """The grid area-resized to each scale's side, flattened row-major and concatenated: (1, L, C)."""
        pos = [F.interpolate(self.pos_1LC, size=(pn, pn), mode='area').flatten(2)
               for pn in self.check_schedule(patch_nums)]
        return torch.cat(pos, dim=2).transpose(1, 2)

    def attn_mask(self, patch_nums: Sequence[int]) -> torch.Tensor:
        patch_nums = self.check_schedule(patch_nums)
        if patch_nums == self.patch_nums:
            return self.attn_bias_for_masking
        return block_causal_mask(patch_nums)[1].to(self.attn_bias_for_masking.device)

    def code_book(self) -> torch.Tensor:
        return self.vae_quant_proxy[0].code_book()

    def new_canvas(self, B: int, patch_nums: Sequence[int], like: torch.Tensor):
        """The canvas is the latest scale's codes map; nothing before the first scale."""
        return None

    def advance(self, si: int, patch_nums: Sequence[int], canvas, h_BChw: torch.Tensor):
        """Scale ``si``'s codes replace the canvas; the next input is them bicubic-resized to the next side."""
        if si == len(patch_nums) - 1:
            return h_BChw, None
        return h_BChw, F.interpolate(h_BChw, size=(patch_nums[si + 1],) * 2, mode='bicubic')

    def decode(self, canvas) -> torch.Tensor:
        return self.vae_proxy[0].codes_to_img(canvas)

    def guidance(self, si: int, pn: int, patch_nums: Sequence[int], cfg: float, logits_BlV: torch.Tensor, B: int,
                 max_pn: int = 16, used_llamagen_cfg: bool = False, invalid_ids=None, **kw) -> torch.Tensor:
        """``invalid_ids`` get logit -100 first.  VAR's rule (1 + t) c - t u with t = cfg si / min(K - 1, 9), or the
        full cfg above ``max_pn``; with ``used_llamagen_cfg``: u + (c - u) cfg at every scale."""
        if invalid_ids is not None:
            logits_BlV[:, :, invalid_ids] = -100.0
        cond, uncond = logits_BlV[:B], logits_BlV[B:]
        if used_llamagen_cfg:
            return uncond + (cond - uncond) * cfg
        t = cfg * si / max(min(len(patch_nums) - 1, 9), 1) if pn <= max_pn else cfg
        return (1 + t) * cond - t * uncond

    def top_k_at(self, si: int, pn: int, top_k: int, max_pn: int = 16, **kw) -> int:
        return 1 if pn > max_pn or pn not in FLEX_TOPK_SIDES else top_k

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: Optional[torch.Tensor]) -> torch.Tensor:
        """The official FlexVAR head runs in the autocast dtype (VAR's forces fp32): same logits under autocast."""
        return self.head(self.head_nm(h_BLC, cond_BD))

    # ---- checkpoints: the stored mask is the one of whatever schedule ran last; rebuilt, as the official loader does
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'attn_bias_for_masking'
        stored = state_dict.get(key)
        if isinstance(stored, torch.Tensor) and stored.dim() == 4 and stored.shape[:2] == (1, 1) \
                and stored.shape[2] == stored.shape[3]:
            state_dict[key] = block_causal_mask(self.patch_nums)[1]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- teacher forcing ---------------------------------------------------------------------------------------------
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor,
                infer_patch_nums: Optional[Sequence[int]] = None,
                iters: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits (B, L, V) of every token of the schedule ``infer_patch_nums`` (default: the model's), given the
        ground-truth earlier scales.

        :param x_BLCv_wo_first_l: (B, L - 1, Cvae), from ``vae.quantize.idxBl_to_var_input(idx_Bl, patch_nums)``
        :param iters: implicit backbone only: (n0, n1) fixed-point steps without / with gradient
        """
        patch_nums = self.check_schedule(infer_patch_nums)
        L = sum(pn * pn for pn in patch_nums)
        if x_BLCv_wo_first_l.shape[1] != L - self.first_l:
            raise ValueError(f'the schedule {"_".join(map(str, patch_nums))} has {L} tokens, so the teacher-forcing '
                             f'input needs {L - self.first_l}, got {x_BLCv_wo_first_l.shape[1]}')
        return self.teacher_forcing(label_B, x_BLCv_wo_first_l, patch_nums, iters)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def autoregressive_infer_cfg(self, *args, vqvae: Optional[nn.Module] = None, **kwargs):
        """``sample`` with the official call form too: a leading positional module (the official ``vqvae`` argument), or
        ``vqvae=``, is accepted and ignored -- the model always decodes with the tokenizer it was built on."""
        if args and isinstance(args[0], nn.Module):
            args = args[1:]
        return self.sample(*args, **kwargs)

    @torch.no_grad()
    def sample(
        self, B: int, label_B: Optional[Union[int, torch.LongTensor]], infer_patch_nums: Optional[Sequence[int]] = None,
        g_seed: Optional[int] = None, cfg=1.5, top_k=0, top_p=0.0, more_smooth=False, max_pn: int = 16,
        used_llamagen_cfg: bool = False, invalid_ids=None, ret_idx_Bl: bool = False, iter_left=10, iter_right=10,
        iter_tol: Optional[float] = None, trace: Optional[Dict[str, list]] = None,
        input_img_tokens: Optional[List[torch.Tensor]] = None, edit_mask: Optional[torch.Tensor] = None,
        iter_exit: str = 'batch', iter_solver: str = 'picard', anderson_m: int = 5, anderson_beta: float = 1.0,
        warm_start: bool = False,
    ):
        """Class-conditional generation over the schedule ``infer_patch_nums`` (default: the model's); images
        (B, 3, 16 pn_last, 16 pn_last) in [0, 1] (decoder output clamped to [-1, 1], then mapped).

        :param max_pn: scales with a larger side use the full ``cfg`` and greedy (top-1) draws
        :param used_llamagen_cfg: guidance u + (c - u) cfg at every scale instead of VAR's ramp
        :param invalid_ids: token indices never drawn (their logits are set to -100)
        The other arguments are ``VAR.autoregressive_infer_cfg``'s (``iter_*``, ``anderson_*``, ``warm_start``:
        implicit backbone only; ``input_img_tokens``: ``vae.img_to_idxBl(img, infer_patch_nums)``).
        """
        with self.inference_autocast():
            return self._sample(
                B, label_B, patch_nums=self.check_schedule(infer_patch_nums), g_seed=g_seed, cfg=cfg, top_k=top_k,
                top_p=top_p, more_smooth=more_smooth, iter_left=iter_left, iter_right=iter_right, ret_idx_Bl=ret_idx_Bl,
                input_img_tokens=input_img_tokens, edit_mask=edit_mask, trace=trace,
                fp=FixedPointOptions(iter_tol, iter_exit, iter_solver, anderson_m, anderson_beta, bool(warm_start)),
                max_pn=max_pn, used_llamagen_cfg=used_llamagen_cfg, invalid_ids=invalid_ids)
