"""FlexVAR's tokenizer (its published layout): LlamaGen's VQ-16 with an l2-normalised codebook, at any scales.

encoder -> 1x1 ``quant_conv`` (z_channels -> Cvae) gives a feature map ``f`` (B, Cvae, H/16, W/16).  The tokens of
a schedule ``patch_nums`` are **not** residual: scale k is ``f`` area-resized to pn_k x pn_k, each vector replaced by
its nearest codebook entry (both l2-normalised: the nearest by cosine).  An image is decoded from ONE scale's codes
(the last one): 1x1 ``post_quant_conv`` (Cvae -> z_channels) -> decoder.  Images are in [-1, 1].

Training (``train_vae.py --flex``): ``forward`` quantises the full feature map and, optionally, the map area-resized to
one smaller side, each with LlamaGen's loss (``L2Quantizer.forward``: straight-through estimator, codebook + beta
commitment loss on the normalised vectors), and decodes each at its own size.

Key names follow the published file (``{'model': state_dict}``): ``encoder.conv_blocks.{i}.res.{j}`` / ``.attn.{j}``
/ ``.downsample``, ``encoder.mid.{0,1,2}`` (block, attention with separate ``q``, ``k``, ``v`` 1x1 convs, block),
``decoder.conv_blocks.{i}`` (lowest resolution first, with ``.upsample``), ``quantize.embedding``,
``quantize.codebook_used`` (a usage record of the tokenizer's training; unused here).
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .basic_vae import Downsample2x, Normalize, ResnetBlock, Upsample2x

__all__ = ['FlexVAE', 'FlexRecon', 'L2Quantizer', 'FLEX_PATCH_NUMS']

FLEX_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)     # FlexVAR's default (training) schedule at 256 px


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``, written as LlamaGen writes it: ``F.silu`` rounds differently in the last bit, enough to
    move a nearest-code search off the official indices."""
    return x * torch.sigmoid(x)


class SwishResnetBlock(ResnetBlock):
    """The res block of ``basic_vae`` (same keys: norm1, conv1, norm2, conv2, nin_shortcut) with LlamaGen's swish."""

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class QKVAttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 ``q``, ``k``, ``v`` convs: softmax(q.k / sqrt(C)) v,
    1x1 ``proj_out``, residual."""

    def __init__(self, C: int, norm_groups: int = 32):
        super().__init__()
        self.norm = Normalize(C, norm_groups)
        self.q, self.k, self.v = (nn.Conv2d(C, C, kernel_size=1) for _ in range(3))
        self.proj_out = nn.Conv2d(C, C, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = self.q(h).reshape(B, C, H * W), self.k(h).reshape(B, C, H * W), self.v(h).reshape(B, C, H * W)
        w_BLL = F.softmax(torch.bmm(q.permute(0, 2, 1), k) * (int(C) ** -0.5), dim=2)     # (query, key)
        h_BCL = torch.bmm(v, w_BLL.permute(0, 2, 1))
        return x + self.proj_out(h_BCL.reshape(B, C, H, W))


def _level(res: List[nn.Module], attn: List[nn.Module], resample: Optional[nn.Module], resample_name: str):
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def _run_level(level: nn.Module, h: torch.Tensor, resample_name: str) -> torch.Tensor:
    """A ``_level``: its res blocks, each followed by its attention block if the level has them, then its resampling
    (``resample_name``) if it has one."""
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    if hasattr(level, resample_name):
        h = getattr(level, resample_name)(h)
    return h


def _mid(block_in: int, dropout: float, norm_groups: int) -> nn.ModuleList:
    """``mid.{0,1,2}`` of the encoder and the decoder: res block, attention, res block."""
    return nn.ModuleList([SwishResnetBlock(in_channels=block_in, dropout=dropout, norm_groups=norm_groups),
                          QKVAttnBlock(block_in, norm_groups),
                          SwishResnetBlock(in_channels=block_in, dropout=dropout, norm_groups=norm_groups)])


class Encoder(nn.Module):
    """conv_in -> per level: res blocks (+ attention at the lowest level), downsample -> mid (block, attention,
    block) -> GroupNorm, swish, conv_out (z_channels)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, dropout=0.0,
                 norm_groups=32, in_channels=3):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(SwishResnetBlock(in_channels=block_in, out_channels=ch * mult, dropout=dropout,
                                            norm_groups=norm_groups))
                block_in = ch * mult
                if i == n - 1:
                    attn.append(QKVAttnBlock(block_in, norm_groups))
            self.conv_blocks.append(_level(res, attn, Downsample2x(block_in) if i != n - 1 else None, 'downsample'))
        self.mid = _mid(block_in, dropout, norm_groups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h, 'downsample')
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in (z_channels) -> mid -> per level from the lowest resolution: num_res_blocks + 1 res blocks (+ attention
    at the lowest level), upsample -> GroupNorm, swish, conv_out (RGB)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, dropout=0.0,
                 norm_groups=32, out_channels=3):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, dropout, norm_groups)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(SwishResnetBlock(in_channels=block_in, out_channels=ch * ch_mult[i], dropout=dropout,
                                            norm_groups=norm_groups))
                block_in = ch * ch_mult[i]
                if i == n - 1:
                    attn.append(QKVAttnBlock(block_in, norm_groups))
            self.conv_blocks.append(_level(res, attn, Upsample2x(block_in) if i != 0 else None, 'upsample'))
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = _run_level(level, h, 'upsample')
        return self.conv_out(swish(self.norm_out(h)))


class L2Quantizer(nn.Module):
    """Single-scale vector quantiser with an l2-normalised codebook; the multi-scale logic lives in its callers."""

    def __init__(self, vocab_size: int, Cvae: int, usage_len: int = 65536):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.register_buffer('codebook_used', torch.zeros(usage_len))   # the published file's usage record

    def code_book(self) -> torch.Tensor:
        """The normalised codebook (V, Cvae): what a token index stands for."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def forward(self, z_BChw: torch.Tensor, beta: float = 0.25):
        """LlamaGen's training quantisation of one map (fp32, outside autocast): every vector and the codebook
        l2-normalised, each vector replaced by its nearest code; loss = mean((e - sg(z))^2) (codebook) + beta *
        mean((sg(e) - z)^2) (commitment) on the normalised vectors; straight-through gradient to ``z``.  In training
        mode the indices go to the rolling ``codebook_used`` record, as LlamaGen keeps it.

        :return: (codes (B, Cvae, h, w) with the straight-through gradient, loss, indices (B*h*w,))
        """
        B, C, h, w = z_BChw.shape
        with torch.autocast(device_type=z_BChw.device.type, enabled=False):
            z_NC = F.normalize(z_BChw.float().permute(0, 2, 3, 1).reshape(-1, C), p=2, dim=-1)
            e_VC = self.code_book().float()
            with torch.no_grad():
                d_NV = torch.sum(z_NC ** 2, dim=1, keepdim=True) + torch.sum(e_VC ** 2, dim=1) - 2 * (z_NC @ e_VC.T)
                idx_N = torch.argmin(d_NV, dim=1)
            q_NC = e_VC[idx_N]
            loss = F.mse_loss(q_NC, z_NC.detach()) + beta * F.mse_loss(q_NC.detach(), z_NC)
            q_NC = z_NC + (q_NC - z_NC).detach()
        if self.training:
            with torch.no_grad():
                used, n = self.codebook_used, min(idx_N.numel(), self.codebook_used.numel())
                used[:used.numel() - n] = used[n:].clone()
                used[used.numel() - n:] = idx_N[idx_N.numel() - n:].to(used.dtype)
        return q_NC.view(B, h, w, C).permute(0, 3, 1, 2).contiguous(), loss, idx_N

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry of each (normalised) vector, by squared L2 as LlamaGen computes it."""
        z_NC = F.normalize(z_NC, p=2, dim=-1)
        e_VC = self.code_book()
        d_NV = torch.sum(z_NC ** 2, dim=1, keepdim=True) + torch.sum(e_VC ** 2, dim=1) - 2 * (z_NC @ e_VC.T)
        return torch.argmin(d_NV, dim=1)

    def idx_to_codes(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Token map (B, pn*pn) -> normalised codes (B, Cvae, pn, pn)."""
        B, l = idx_Bl.shape
        pn = round(l ** 0.5)
        return F.embedding(idx_Bl, self.code_book()).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor],
                           patch_nums: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
        """Teacher-forcing input of FlexVAR, (B, L - first_l, Cvae): the codes of each scale but the last,
        bicubic-resized to the next scale's side.  ``patch_nums`` defaults to the sides of the token maps."""
        sizes = [t.shape[1] for t in gt_ms_idx_Bl]
        patch_nums = tuple(patch_nums) if patch_nums is not None else tuple(round(l ** 0.5) for l in sizes)
        if len(patch_nums) != len(sizes) or any(l != pn * pn for l, pn in zip(sizes, patch_nums)):
            raise ValueError(f'token maps of sizes {sizes} do not fit the scales {patch_nums}')
        B, nxt = gt_ms_idx_Bl[0].shape[0], []
        for si in range(len(patch_nums) - 1):
            h_BChw = F.interpolate(self.idx_to_codes(gt_ms_idx_Bl[si]), size=(patch_nums[si + 1],) * 2, mode='bicubic')
            nxt.append(h_BChw.reshape(B, self.Cvae, -1))
        return torch.cat(nxt, dim=2).transpose(1, 2) if nxt else None


class FlexRecon(NamedTuple):
    """What ``FlexVAE.forward`` returns."""
    rec: torch.Tensor                   # (B, 3, H, W): the full feature map quantised and decoded (not clamped)
    rec_small: Optional[torch.Tensor]   # (B, 3, d pn, d pn): the map area-resized to pn x pn, quantised, decoded
    vq_loss: torch.Tensor               # LlamaGen's codebook + beta commitment loss, mean over the quantised maps
    idx: List[torch.Tensor]             # token indices (B*h*w,) of each quantised map (full first; none unquantised)


class FlexVAE(nn.Module):
    def __init__(self, vocab_size=8912, Cvae=32, ch=128, z_channels=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 norm_groups=32, dropout=0.0, v_patch_nums: Sequence[int] = FLEX_PATCH_NUMS, test_mode=True):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae, self.ch, self.z_channels = Cvae, ch, z_channels
        self.arch = dict(ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, norm_groups=norm_groups)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.v_patch_nums = tuple(v_patch_nums)     # the default schedule of img_to_idxBl
        net = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                   dropout=dropout, norm_groups=norm_groups)
        self.encoder, self.decoder = Encoder(**net), Decoder(**net)
        self.quantize = L2Quantizer(vocab_size, Cvae)
        self.quant_conv = nn.Conv2d(z_channels, Cvae, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(Cvae, z_channels, kernel_size=1)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    # ---- training ----
    def forward(self, inp_B3HW: torch.Tensor, small_pn: Optional[int] = None, beta: float = 0.25,
                quantize: bool = True) -> FlexRecon:
        """Training forward of ``train_vae.py --flex``: the feature map ``f`` quantised (``L2Quantizer.forward``) and
        decoded; with ``small_pn`` also ``f`` area-resized to small_pn x small_pn -- one scale of a FlexVAR schedule, as
        ``f_to_idxBl`` tokenises it -- quantised and decoded at its own size (the image a schedule ending at that side
        gives).  ``quantize=False``: the normalised features are decoded instead (a plain autoencoder warm-up)."""
        f = self.img_to_f(inp_B3HW)
        maps = [f] + ([F.interpolate(f, size=(small_pn, small_pn), mode='area')] if small_pn else [])
        recs, losses, idx = [], [], []
        for z in maps:
            if quantize:
                h, loss, idx_N = self.quantize(z, beta)
                losses.append(loss)
                idx.append(idx_N)
            else:
                h = F.normalize(z, p=2, dim=1)
            recs.append(self.decoder(self.post_quant_conv(h)))
        vq_loss = torch.stack(losses).mean() if losses else f.new_zeros((), dtype=torch.float32)
        return FlexRecon(recs[0], recs[1] if small_pn else None, vq_loss, idx)

    # ---- encoding ----
    def img_to_f(self, inp_B3HW: torch.Tensor) -> torch.Tensor:
        """Feature map before quantisation, (B, Cvae, H/16, W/16)."""
        return self.quant_conv(self.encoder(inp_B3HW))

    def f_to_idxBl(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.LongTensor]:
        """Token map (B, pn*pn) of each scale: ``f`` area-resized to pn x pn, nearest normalised code."""
        B, C = f_BChw.shape[:2]
        out = []
        for pn in patch_nums:
            z_BChw = F.interpolate(f_BChw, size=(pn, pn), mode='area')
            out.append(self.quantize.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn))
        return out

    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor,
                     patch_nums: Optional[Sequence[int]] = None) -> List[torch.LongTensor]:
        """Images in [-1, 1] -> token map of every scale of ``patch_nums`` (default ``v_patch_nums``)."""
        return self.f_to_idxBl(self.img_to_f(inp_img_no_grad), patch_nums or self.v_patch_nums)

    # ---- decoding ----
    def codes_to_img(self, h_BChw: torch.Tensor) -> torch.Tensor:
        """One scale's codes (B, Cvae, pn, pn) -> image (B, 3, 16 pn, 16 pn) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(h_BChw)).clamp_(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], last_one: bool = True):
        """The image of the last token map (``last_one``) or of every one (list), in [-1, 1]."""
        imgs = [self.codes_to_img(self.quantize.idx_to_codes(idx_Bl))
                for idx_Bl in (ms_idx_Bl[-1:] if last_one else ms_idx_Bl)]
        return imgs[0] if last_one else imgs

    def img_to_reconstructed_img(self, x: torch.Tensor, patch_nums: Optional[Sequence[int]] = None,
                                 last_one: bool = True):
        """Tokenise at every scale and decode (the last scale's image, or one per scale)."""
        return self.idxBl_to_img(self.img_to_idxBl(x, patch_nums), last_one=last_one)

    def init_weights(self):
        """PyTorch's default initialisation and LlamaGen's codebook init (uniform +-1/V, normalised)."""
        for m in self.modules():
            if m is not self and hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        w = self.quantize.embedding.weight
        nn.init.uniform_(w, -1 / self.vocab_size, 1 / self.vocab_size)
        w.data.copy_(F.normalize(w.data, p=2, dim=-1))
        self.quantize.codebook_used.zero_()

    def extra_repr(self) -> str:
        return f'V={self.vocab_size}, Cvae={self.Cvae}, ch={self.ch}, z_channels={self.z_channels}'
