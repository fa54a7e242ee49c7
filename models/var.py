"""VAR and VIAR: next-scale prediction transformers.

Both share everything but the backbone between the embeddings and the head:

* ``ExplicitBackbone`` (VAR): ``depth`` AdaLN self-attention blocks (``blocks.*``).
* ``ImplicitBackbone`` (VIAR): ``p_depth`` pre blocks, one implicit equilibrium block iterated as
  ``z <- implicit_block(proj([z ; u]))`` from ``z = u`` (u: output of the pre blocks, the input injection), then
  ``p_depth`` post blocks.  Trained with Jacobian-free backprop: n0 steps without gradient, then n1 with.

The backbone's modules are registered on the VAR module itself, under the names of the published checkpoints
(``blocks.*`` or ``pre_blocks.*``, ``implicit_block.*``, ``implicit_block_projection.*``, ``post_blocks.*``).
"""
import math
import random
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .basic_var import AdaLNBeforeHead, AdaLNSelfAttn
from .helpers import gumbel_softmax_with_rng, sample_with_top_k_top_p_
from .vqvae import VQVAE

__all__ = ['VAR', 'ExplicitBackbone', 'ImplicitBackbone', 'iterations_per_scale']


def iterations_per_scale(iter_left: int, iter_right: int, num_scales: int) -> List[int]:
    """Implicit iterations at each scale: ``int(linspace(iter_left, iter_right, K)[k])`` (cast toward zero)."""
    if min(iter_left, iter_right) < 0:
        raise ValueError(f'iteration counts must be >= 0, got iter_left={iter_left}, iter_right={iter_right}')
    return [int(n) for n in np.linspace(iter_left, iter_right, num_scales)]


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)   # B16C


# ============================================== backbones =============================================================
class ExplicitBackbone(nn.Module):
    """VAR: a stack of ``depth`` blocks."""

    def __init__(self, make_block, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([make_block(i) for i in range(depth)])

    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return list(self.blocks)

    def forward(self, x_BLC, cond_BD_or_gss, attn_bias, iters=None):
        for b in self.blocks:
            x_BLC = b(x_BLC, cond_BD_or_gss, attn_bias)
        return x_BLC

    # ---- sampling with KV cache ----
    def start_sampling(self, L: int, schedule: Sequence[int]):
        for b in self.blocks:
            b.attn.kv_caching(True, capacity=L)

    def sample_scale(self, x_BlC, adas, si: int, schedule: Sequence[int]):
        for b, ada in zip(self.blocks, adas):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        return x_BlC


class ImplicitBackbone(nn.Module):
    """VIAR: pre blocks -> implicit equilibrium block (with input-injection projection) -> post blocks."""

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

    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return [*self.pre_blocks, self.implicit_block, *self.post_blocks]

    def draw_iters(self) -> Tuple[int, int]:
        """(n0, n1) for one training step, uniform in the configured ranges (Python's ``random``, as the official
        code; seed it for reproducible runs)."""
        return (random.randint(self.implicit_no_grad_min_iters, self.implicit_no_grad_max_iters),
                random.randint(self.implicit_with_grad_min_iters, self.implicit_with_grad_max_iters))

    def injection(self, u_BLC: torch.Tensor) -> torch.Tensor:
        """The input injection's share of the projection's first layer, ``W[:, C:] u + b``.  u is fixed during the
        fixed-point iteration, so it is computed once per forward (per scale when sampling), not once per step:
        ``proj([z ; u]) = W2 gelu(W[:, :C] z + injection(u)) + b2`` saves 1/3 of the projection's FLOPs and the
        (B, L, 2C) concatenation of every step."""
        lin0 = self.implicit_block_projection[0]
        return F.linear(u_BLC, lin0.weight[:, u_BLC.shape[-1]:], lin0.bias)

    def project(self, z_BLC: torch.Tensor, inj_BLC: torch.Tensor) -> torch.Tensor:
        lin0, act, lin1 = self.implicit_block_projection
        return lin1(act(F.linear(z_BLC, lin0.weight[:, :z_BLC.shape[-1]]).add_(inj_BLC)))

    def implicit_step(self, z_BLC, u_BLC, cond_BD_or_gss, attn_bias, cur_it=0, ada_B16C=None, inj_BLC=None):
        """One fixed-point step ``z <- implicit_block(proj([z ; u]))``; pass ``inj_BLC = injection(u)`` when
        iterating (computed here otherwise)."""
        if inj_BLC is None:
            inj_BLC = self.injection(u_BLC)
        z_BLC = self.project(z_BLC, inj_BLC)
        return self.implicit_block(z_BLC, cond_BD_or_gss, attn_bias, cur_it=cur_it, ada_B16C=ada_B16C)

    def forward(self, x_BLC, cond_BD_or_gss, attn_bias, iters: Optional[Tuple[int, int]] = None):
        """Teacher forcing.  ``iters=(n0, n1)``: n0 fixed-point steps without gradient (run under ``no_grad``: no
        activation is kept, so memory does not grow with n0), then n1 steps with gradient into the implicit
        block, the projection and, through the injection u, the pre blocks.  Default: drawn at random in
        training, ``(0, implicit_eval_iters)`` in eval mode (a deterministic validation loss)."""
        for b in self.pre_blocks:
            x_BLC = b(x_BLC, cond_BD_or_gss, attn_bias)
        if iters is None:
            iters = self.draw_iters() if self.implicit_block.training else (0, self.implicit_eval_iters)
        n_no_grad, n_with_grad = iters
        u_BLC = x_BLC
        z_BLC = u_BLC.detach()
        # W[:, C:] u + b, once for all steps (with gradient into the projection and, through u, the pre blocks)
        inj_BLC = self.injection(u_BLC)
        if n_no_grad > 0:
            with torch.no_grad():
                for it in range(n_no_grad):
                    z_BLC = self.implicit_step(z_BLC, u_BLC, cond_BD_or_gss, attn_bias, cur_it=it, inj_BLC=inj_BLC)
        for it in range(n_with_grad):
            z_BLC = self.implicit_step(z_BLC, u_BLC, cond_BD_or_gss, attn_bias, cur_it=it, inj_BLC=inj_BLC)
        x_BLC = z_BLC
        for b in self.post_blocks:
            x_BLC = b(x_BLC, cond_BD_or_gss, attn_bias)
        return x_BLC

    # ---- sampling with KV cache ----
    def start_sampling(self, L: int, schedule: Sequence[int]):
        for b in (*self.pre_blocks, *self.post_blocks):
            b.attn.kv_caching(True, capacity=L)
        # iteration i at scale k attends to the keys of iteration i at the earlier scales that ran it
        scale_lens = self._scale_lens
        capacity = {i: sum(l for l, n in zip(scale_lens, schedule) if n > i) for i in range(max(schedule, default=0))}
        self.implicit_block.attn.kv_caching(True, capacity=capacity)

    def sample_scale(self, x_BlC, adas, si: int, schedule: Sequence[int]):
        ada_pre, ada_imp, ada_post = adas[:len(self.pre_blocks)], adas[len(self.pre_blocks)], adas[len(self.pre_blocks) + 1:]
        for b, ada in zip(self.pre_blocks, ada_pre):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        u_BlC = z_BlC = x_BlC
        inj_BlC = self.injection(u_BlC) if schedule[si] > 0 else None
        for it in range(schedule[si]):
            z_BlC = self.implicit_step(z_BlC, u_BlC, None, None, cur_it=it, ada_B16C=ada_imp, inj_BLC=inj_BlC)
        # free the caches of iteration indices no later scale runs
        later_max = max(schedule[si + 1:], default=0)
        for it in range(later_max, schedule[si]):
            self.implicit_block.attn.free_cache(it)
        x_BlC = z_BlC
        for b, ada in zip(self.post_blocks, ada_post):
            x_BlC = b(x_BlC, None, None, ada_B16C=ada)
        return x_BlC


# ============================================== VAR ===================================================================
class VAR(nn.Module):
    def __init__(
        self, vae_local: VQVAE,
        num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0,
        drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=False,
        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), flash_if_available=True, fused_if_available=True,
        use_implicit=False, pre_depth=5, post_depth=5,
        implicit_no_grad_min_iters=0, implicit_no_grad_max_iters=10,
        implicit_with_grad_min_iters=1, implicit_with_grad_max_iters=12,
    ):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.use_implicit = use_implicit
        self.pre_depth, self.post_depth = (pre_depth, post_depth) if use_implicit else (0, 0)

        self.patch_nums: Tuple[int, ...] = tuple(patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self._rngs = {}

        # 1. input (word) embedding; the tokenizer is held by reference, not as a sub-module (not in state_dict)
        self.vae_proxy: Tuple[VQVAE] = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)
        self.word_embed = nn.Linear(self.Cvae, self.C)

        # 2. class embedding (the last row is the unconditional class) and start token position
        init_std = math.sqrt(1 / self.C / 3)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))

        # 3. absolute position embedding and level (scale) embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            if not p.is_meta:
                nn.init.trunc_normal_(p.data, mean=0, std=init_std)

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
                attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available, fused_if_available=fused_if_available)

        if use_implicit:
            backbone = ImplicitBackbone(
                make_block, depth, pre_depth, post_depth, self.C,
                no_grad_iters=(implicit_no_grad_min_iters, implicit_no_grad_max_iters),
                with_grad_iters=(implicit_with_grad_min_iters, implicit_with_grad_max_iters))
            backbone._scale_lens = [pn ** 2 for pn in self.patch_nums]
        else:
            backbone = ExplicitBackbone(make_block, depth)
        for name, module in backbone.named_children():   # official checkpoint names, registered once, here
            self.add_module(name, module)
        object.__setattr__(self, 'backbone', backbone)    # the logic that runs them (not a second owner)

        # 5. block-causal mask for teacher forcing: a token of scale i sees every token of scales <= i
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer('lvl_1L', dT[:, 0].contiguous())
        self.register_buffer('attn_bias_for_masking',
                             torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())

        # 6. classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    # ------------------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.training = mode
        return self

    def all_blocks(self) -> List[AdaLNSelfAttn]:
        return self.backbone.all_blocks()

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: Optional[torch.Tensor]) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def _rng(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._rngs:
            self._rngs[key] = torch.Generator(device=device)
        return self._rngs[key]

    # ================================ teacher forcing ===================================================================
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor,
                iters: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits (B, L, V) of every token given the ground-truth earlier scales.

        :param label_B: class labels (B,); replaced by the unconditional class with probability cond_drop_rate
        :param x_BLCv_wo_first_l: teacher-forcing input (B, L - first_l, Cvae), from ``idxBl_to_var_input``
        :param iters: VIAR only: (n0, n1) fixed-point steps without / with gradient (default: drawn at random)
        """
        B = x_BLCv_wo_first_l.shape[0]
        dev_type = x_BLCv_wo_first_l.device.type
        with torch.autocast(device_type=dev_type, enabled=False):
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        attn_bias = self.attn_bias_for_masking
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        # under autocast, run the backbone in the autocast dtype
        main_type = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else x_BLC.dtype
        x_BLC, cond_BD_or_gss, attn_bias = x_BLC.to(main_type), cond_BD_or_gss.to(main_type), attn_bias.to(main_type)
        x_BLC = self.backbone(x_BLC, cond_BD_or_gss, attn_bias, iters=iters)
        return self.get_logits(x_BLC.float(), cond_BD)

    # ================================ sampling ==========================================================================
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed: Optional[int] = None, cfg=1.5,
        top_k=0, top_p=0.0, more_smooth=False, iter_left=10, iter_right=10, ret_idx_Bl: bool = False,
    ):
        """Class-conditional generation with classifier-free guidance; returns images (B, 3, H, W) in [0, 1].

        :param label_B: class labels (B,); None: uniform random classes drawn with the seeded generator;
                        an int: that class for all (negative: unconditional)
        :param g_seed: seed of the sampling generator (None: the global RNG)
        :param cfg: guidance; at scale k the logits are (1 + t) cond - t uncond with t = cfg * k / (K - 1)
        :param top_k, top_p: filtering before the multinomial draw (0: off)
        :param more_smooth: gumbel-softmax mixture of codes (visualisation only, not for FID)
        :param iter_left, iter_right: VIAR only: implicit iterations at the first / last scale, linear in between
        :param ret_idx_Bl: also return the token map drawn at every scale (list of (B, pn*pn))
        """
        dev = self.lvl_1L.device
        rng = None if g_seed is None else self._rng(dev).manual_seed(g_seed)
        if label_B is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32, device=dev)
            label_B = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=dev)
        label_B = label_B.to(dev)
        if label_B.numel() != B:
            raise ValueError(f'label_B has {label_B.numel()} labels for B={B}')

        K = len(self.patch_nums)
        schedule = iterations_per_scale(iter_left, iter_right, K) if self.use_implicit else [0] * K
        vae, quant = self.vae_proxy[0], self.vae_quant_proxy[0]
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes)), dim=0))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_token_map = (sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
                          + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l])
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        # the class condition is the same at every scale: modulation vectors computed once per block
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        adas = [b.ada(cond_BD_or_gss) for b in self.all_blocks()]
        idx_Bl_per_scale = []

        self.backbone.start_sampling(self.L, schedule)
        try:
            cur_L = 0
            for si, pn in enumerate(self.patch_nums):
                ratio = si / self.num_stages_minus_1
                cur_L += pn * pn
                x_BlC = self.backbone.sample_scale(next_token_map, adas, si, schedule)
                logits_BlV = self.get_logits(x_BlC, cond_BD)
                t = cfg * ratio
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
                idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=1)[:, :, 0]
                idx_Bl_per_scale.append(idx_Bl)
                if not more_smooth:
                    h_BlC = quant.embedding(idx_Bl)
                else:   # visualisation only
                    gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                    h_BlC = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=gum_t, hard=False, dim=-1, rng=rng) \
                        @ quant.embedding.weight.unsqueeze(0)
                h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_token_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
                if si != self.num_stages_minus_1:
                    next_token_map = next_token_map.view(B, self.Cvae, -1).transpose(1, 2)
                    next_token_map = self.word_embed(next_token_map) + lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                    next_token_map = next_token_map.repeat(2, 1, 1)     # conditional rows, then unconditional
        finally:
            self.kv_caching(False)
        img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        return (img, idx_Bl_per_scale) if ret_idx_Bl else img

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

    # ================================ initialisation ====================================================================
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=0.02, conv_std_or_gain=0.02):
        """Fresh-training initialisation: trunc-normal everywhere, head x init_head, AdaLN gamma rows x
        init_adaln_gamma and the other rows x init_adaln, attention ``proj`` and ``fc2`` / sqrt(2 depth) (the
        nominal depth, also for VIAR)."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None: m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.padding_idx is not None: m.weight.data[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None: m.weight.data.fill_(1.0)
                if m.bias is not None: m.bias.data.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p.data, mean=0, std=math.sqrt(1 / self.C / 3))
        for blk in self.all_blocks():
            attn = blk.attn
            attn.q_bias.data.zero_(); attn.v_bias.data.zero_(); attn.zero_k_bias.zero_()
            if attn.attn_l2_norm:
                attn.scale_mul_1H11.data.fill_(math.log(4.0))
        self._reset_buffers()
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

    def _reset_buffers(self):
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.lvl_1L.copy_(dT[:, 0])
        self.attn_bias_for_masking.copy_(torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L))

    def extra_repr(self):
        kind = f'VIAR(pre={self.pre_depth}, implicit=1, post={self.post_depth})' if self.use_implicit else 'VAR'
        return f'{kind}, depth={self.depth}, drop_path_rate={self.drop_path_rate:g}'


# the JFB iteration ranges live on the backbone; VAR exposes them under their official names
for _name in ('implicit_no_grad_min_iters', 'implicit_no_grad_max_iters', 'implicit_with_grad_min_iters',
              'implicit_with_grad_max_iters', 'implicit_eval_iters'):
    setattr(VAR, _name, property(lambda self, n=_name: getattr(self.backbone, n),
                                 lambda self, v, n=_name: setattr(self.backbone, n, v)))
