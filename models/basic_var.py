"""The transformer pieces shared by VAR and VIAR: FFN, self-attention with a KV cache, the AdaLN block and the
AdaLN before the head.  Key names follow the published checkpoints (``attn.mat_qkv``, ``attn.q_bias``,
``attn.zero_k_bias``, ``ffn.fc1``, ``ada_lin.1`` / ``ada_gss`` ...)."""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import DropPath

__all__ = ['FFN', 'SelfAttention', 'AdaLNSelfAttn', 'AdaLNBeforeHead', 'KVCache']

# Optional flash-attn kernel (CUDA, half precision, no mask: the KV-cached sampler); SDPA is used otherwise.
flash_attn_func = None
try:
    from flash_attn import flash_attn_func  # q, k, v: B L H c
except ImportError:
    pass


class FFN(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class KVCache:
    """Keys and values of earlier scales for one attention layer (and, in VIAR's implicit block, one iteration
    index).  The buffer is allocated once, at the first write, for ``capacity`` tokens; each scale writes its
    tokens after the previous ones, so there is no concatenation (and no re-allocation) per scale."""

    def __init__(self, capacity: int):
        self.capacity, self.len = capacity, 0
        self.k_BHLc: Optional[torch.Tensor] = None
        self.v_BHLc: Optional[torch.Tensor] = None

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, rows: Optional[Tuple[torch.Tensor, int]] = None):
        """Stores the new keys/values (in the dtype of the first write) and returns views of everything cached so
        far, new ones included.  ``rows = (index, B)``: k and v are the rows ``index`` of a batch of B rows (VIAR's
        per-image early exit); only those are written (the others' new slot is left for ``fill_last``) and the
        cached keys/values of those rows are returned (a copy)."""
        n, H, l, c = k_BHlc.shape
        B = n if rows is None else rows[1]
        if self.k_BHLc is None:
            self.k_BHLc = k_BHlc.new_empty(B, H, max(self.capacity, l), c)
            self.v_BHLc = self.k_BHLc.new_empty(B, H, max(self.capacity, l), c)
        end = self.len + l
        if end > self.k_BHLc.shape[2]:      # more tokens than planned: grow (never hit by the sampler)
            grow = lambda t: torch.cat((t[:, :, :self.len], t.new_empty(B, H, end - self.len, c)), dim=2)
            self.k_BHLc, self.v_BHLc = grow(self.k_BHLc), grow(self.v_BHLc)
        if rows is not None:
            idx = rows[0]
            self.k_BHLc[idx, :, self.len:end] = k_BHlc
            self.v_BHLc[idx, :, self.len:end] = v_BHlc
            self.len = end
            return self.k_BHLc[idx, :, :end], self.v_BHLc[idx, :, :end]
        self.k_BHLc[:, :, self.len:end] = k_BHlc
        self.v_BHLc[:, :, self.len:end] = v_BHlc
        self.len = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]

    def last_slot(self, l: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys/values of the last ``l`` tokens written (the current scale's)."""
        return self.k_BHLc[:, :, self.len - l:self.len], self.v_BHLc[:, :, self.len - l:self.len]

    def nbytes(self) -> int:
        return 0 if self.k_BHLc is None else 2 * self.k_BHLc.numel() * self.k_BHLc.element_size()


class SelfAttention(nn.Module):
    """Multi-head self-attention; with ``attn_l2_norm`` q and k are L2-normalised per head and q is scaled by a
    learnt per-head temperature ``exp(min(scale_mul_1H11, log 100))`` (softmax scale 1)."""

    def __init__(self, block_idx, embed_dim=768, num_heads=12, attn_drop=0.0, proj_drop=0.0, attn_l2_norm=False,
                 flash_if_available=True):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.using_flash = flash_if_available and flash_attn_func is not None
        # inference only: KV caches keyed by the implicit iteration index (explicit blocks use key 0)
        self.caching = False
        self.kv_caches: Dict[int, KVCache] = {}
        self.cache_capacity: Dict[int, int] = {}

    def kv_caching(self, enable: bool, capacity=None):
        """Turns the KV cache on (emptied) or off (freed).  ``capacity``: tokens to reserve, an int for every
        iteration index or a dict {iteration index: tokens}."""
        self.caching, self.kv_caches = enable, {}
        self.cache_capacity = capacity if isinstance(capacity, dict) else {}
        self._default_capacity = capacity if isinstance(capacity, int) else 0

    def cache(self, cur_it: int) -> KVCache:
        """The KV cache of iteration index ``cur_it`` (made, empty, on first use)."""
        cache = self.kv_caches.get(cur_it)
        if cache is None:
            cache = self.kv_caches[cur_it] = KVCache(self.cache_capacity.get(cur_it, self._default_capacity))
        return cache

    def free_cache(self, cur_it: int):
        self.kv_caches.pop(cur_it, None)

    def cache_nbytes(self) -> int:
        return sum(c.nbytes() for c in self.kv_caches.values())

    def qkv(self, x_BLC: torch.Tensor):
        """Queries, keys and values (B, H, L, c).  With ``attn_l2_norm`` q and k are L2-normalised and q is scaled by
        the temperature, in the official order (``F.normalize(q) * scale_mul``): under half-precision autocast any
        other order rounds differently and changes which tokens a seed draws."""
        B, L, C = x_BLC.shape
        qkv_BL3Hc = F.linear(x_BLC, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv_BL3Hc.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul_1H11)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(self, q, k, v, attn_bias, cur_it: int = 0, rows=None) -> torch.Tensor:
        """Attention of q over k, v (and, while caching, the cached keys of earlier scales); returns (B, L, C)
        before the output projection.  The cache is written in place (``KVCache``), in the dtype of v; ``rows``:
        see ``KVCache.append``."""
        B, H, L, c = q.shape
        if self.caching:
            k, v = self.cache(cur_it).append(k.to(v.dtype), v, rows)
        dropout_p = self.attn_drop if self.training else 0.0
        main_type = v.dtype
        if self.using_flash and attn_bias is None and main_type in (torch.float16, torch.bfloat16) and q.is_cuda:
            oup = flash_attn_func(q.to(main_type).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  dropout_p=dropout_p, softmax_scale=self.scale)
            return oup.reshape(B, L, H * c)
        if attn_bias is not None:
            attn_bias = attn_bias.to(main_type)
        # the CPU and CUDA kernels return (B, H, L, c) stored as (B, L, H, c): the reshape below is a view
        oup = F.scaled_dot_product_attention(q.to(main_type), k, v, attn_mask=attn_bias, dropout_p=dropout_p,
                                             scale=self.scale)
        return oup.transpose(1, 2).reshape(B, L, H * c)

    def forward(self, x, attn_bias, cur_it: int = 0):
        q, k, v = self.qkv(x)
        return self.proj_drop(self.proj(self.attend(q, k, v, attn_bias, cur_it=cur_it)))

    def extra_repr(self) -> str:
        return f'using_flash={self.using_flash}, attn_l2_norm={self.attn_l2_norm}'


class AdaLNSelfAttn(nn.Module):
    """x += g1 * attn(LN(x) (1 + s1) + b1);  x += g2 * ffn(LN(x) (1 + s2) + b2), the six vectors from the class
    condition (``ada_lin``), or from a model-level shared projection plus this block's ``ada_gss`` (shared AdaLN)."""

    def __init__(self, block_idx, last_drop_p, embed_dim, cond_dim, shared_aln: bool, norm_layer, num_heads,
                 mlp_ratio=4.0, drop=0.0, attn_drop=0.0, drop_path=0.0, attn_l2_norm=False,
                 flash_if_available=False):
        super().__init__()
        self.block_idx, self.last_drop_p, self.C, self.D = block_idx, last_drop_p, embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, attn_drop=attn_drop,
                                  proj_drop=drop, attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = norm_layer(embed_dim, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def ada(self, cond_BD_or_gss: torch.Tensor) -> torch.Tensor:
        """The six modulation vectors, (B, 1, 6, C).  The sampler computes them once per image batch."""
        if self.shared_aln:
            return self.ada_gss + cond_BD_or_gss
        return self.ada_lin(cond_BD_or_gss).view(-1, 1, 6, self.C)

    def forward(self, x, cond_BD, attn_bias, cur_it: int = 0, ada_B16C: Optional[torch.Tensor] = None, rows=None):
        if ada_B16C is None:
            ada_B16C = self.ada(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        q, k, v = self.attn_in(x, scale1, shift1)
        oup_BLC = self.attn.attend(q, k, v, attn_bias, cur_it=cur_it, rows=rows)   # the KV cache between the halves
        return self.attn_out_ffn(x, oup_BLC, gamma1, gamma2, scale2, shift2)

    # The two halves of the block around the attention kernel are pure functions of tensors (``VAR.compile_blocks``
    # hands them to torch.compile).  The modulation and the residuals keep the official operation order
    # (``LN(x) * (1 + scale) + shift``; ``x + y * gamma`` with y * gamma rounded to y's dtype): same numbers under
    # half-precision autocast.
    def attn_in(self, x, scale1, shift1):
        return self.attn.qkv(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1))

    def attn_out_ffn(self, x, oup_BLC, gamma1, gamma2, scale2, shift2):
        x = x + self.drop_path(self.attn.proj_drop(self.attn.proj(oup_BLC)).mul_(gamma1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))

    def extra_repr(self) -> str:
        return f'shared_aln={self.shared_aln}'


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, D, norm_layer):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
