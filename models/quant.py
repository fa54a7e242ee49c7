"""Multi-scale residual vector quantiser (VAR's ``VectorQuantizer2``).

For each scale k (token maps of side ``v_patch_nums[k]``) the residual ``f_rest`` is area-downsampled, each
vector is replaced by its nearest codebook entry, the codes are bicubic-upsampled back to full size, passed
through the scale's phi (``0.5 h + 0.5 conv3x3(h)``) and added to ``f_hat`` / removed from ``f_rest``.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['VectorQuantizer2', 'Phi']


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""
    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def phi_ticks(K: int) -> np.ndarray:
    """Where the K shared phis sit on [0, 1] (the official rule, with its special case K == 4)."""
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi=1``)."""
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _at_from_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``n`` phis shared across K scales: scale k uses the phi whose tick is nearest to k/(K-1)."""
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))]


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``)."""
    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - at_from_0_to_1))))


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm = vocab_size, Cvae, using_znorm
        self.v_patch_nums: Tuple[int, ...] = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))

        # per-scale EMA of codebook hits (tokenizer training statistics; stored in the published checkpoint)
        self.register_buffer('ema_vocab_hit_SV', torch.zeros(len(self.v_patch_nums), self.vocab_size))
        self.record_hit = 0
        self.beta = beta
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    def extra_repr(self) -> str:
        return f'{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}, quant_resi={self.quant_resi_ratio}'

    def phi(self, si: int, SN: int) -> nn.Module:
        """The phi of scale ``si`` of ``SN``: the one whose tick is nearest to si / (SN - 1)."""
        return self.quant_resi[si / max(SN - 1, 1)]

    # ----------------------------------------------------------------------------------------------------------
    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry, by squared L2 (cosine when ``using_znorm``)."""
        w_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(w_VC.T, dim=0), dim=1)
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(w_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, w_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def _residual_scales(self, f_BChw: torch.Tensor, v_patch_nums=None):
        """The residual quantisation of ``f_BChw``, scale by scale: yields (si, idx_N, h_BChw), h the scale's codes
        upsampled to full size and passed through its phi (with the gradient of the codebook and phi); the residual
        is updated inside, without gradient."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the last scale {patch_hws[-1]} must equal the feature map size {(H, W)}')
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws):
            last = si == SN - 1
            z_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode='area')
            idx_N = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            h_BChw = (h_BChw if last else F.interpolate(h_BChw, size=(H, W), mode='bicubic')).contiguous()
            h_BChw = self.phi(si, SN)(h_BChw)
            f_rest.sub_(h_BChw.detach())
            yield si, idx_N, h_BChw

    # ================================ training forward (tokenizer training only) ==============================
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        """Returns (f_hat with straight-through gradient, per-scale codebook usages in % or None, vq loss).

        vq loss = mean over scales of  beta * ||sg(f_hat) - f||^2 (commitment)  +  ||f_hat - sg(f)||^2 (codebook).
        """
        dtype = f_BChw.dtype
        f_BChw = f_BChw.float()
        C = f_BChw.shape[1]
        f_no_grad = f_BChw.detach()
        f_hat = torch.zeros_like(f_no_grad)
        SN = len(self.v_patch_nums)
        vq_loss = f_BChw.new_zeros(())
        distributed = tdist.is_available() and tdist.is_initialized()
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            for si, idx_N, h_BChw in self._residual_scales(f_BChw):
                hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                if self.training and distributed:
                    tdist.all_reduce(hit_V)
                f_hat = f_hat + h_BChw
                if self.training:
                    with torch.no_grad():
                        if self.record_hit == 0: self.ema_vocab_hit_SV[si].copy_(hit_V)
                        elif self.record_hit < 100: self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
                        else: self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            if self.training:
                self.record_hit += 1
            vq_loss = vq_loss / SN
            f_hat_st = (f_hat.detach() - f_no_grad) + f_BChw      # straight-through estimator
        usages = None
        if ret_usages:
            world = tdist.get_world_size() if distributed else 1
            margin = world * (f_BChw.numel() / C) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(SN)]
        return f_hat_st.to(dtype), usages, vq_loss

    # ================================ inference / teacher forcing =============================================
    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums=None) -> List[torch.Tensor]:
        """Per scale: the cumulative f_hat (B, C, H, W) if ``to_fhat`` else the token indices (B, pn*pn)."""
        B = f_BChw.shape[0]
        f_hat, out = torch.zeros_like(f_BChw), []
        for _si, idx_N, h_BChw in self._residual_scales(f_BChw, v_patch_nums):
            f_hat.add_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, -1))
        return out

    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False):
        B, H = ms_h_BChw[0].shape[0], self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        ls_f_hat = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, H), mode='bicubic')
                f_hat.add_(self.phi(si, SN)(h_BChw))
                if not last_one: ls_f_hat.append(f_hat.clone())
        else:   # experimental: grow f_hat scale by scale instead of working at the largest size
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode='bicubic')
                f_hat.add_(self.phi(si, SN)(ms_h_BChw[si]))
                if not last_one: ls_f_hat.append(f_hat)
        return f_hat if last_one else ls_f_hat

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Teacher-forcing input of the transformer: (B, L - first_l, Cvae), float32."""
        B, C, H = gt_ms_idx_Bl[0].shape[0], self.Cvae, self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, H, dtype=torch.float32)
        next_scales = []
        pn = self.v_patch_nums[0]
        for si in range(SN - 1):
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(H, H), mode='bicubic')))
            pn = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn, pn), mode='area').view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """Adds scale ``si``'s codes to ``f_hat`` (in place); returns (f_hat, next scale's input map)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')))
            pn = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode='area')
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat
