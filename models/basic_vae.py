"""Convolutional encoder/decoder of the multi-scale VQVAE tokenizer.

The layout is the latent-diffusion "vq-f16" one (``ch_mult=(1, 1, 2, 2, 4)``), so that the published
VAR's published tokenizer loads with its own key names: ``encoder.down.{i}.block.{j}``, ``.attn.{j}``,
``.downsample``, ``mid.block_1 / attn_1 / block_2``, ``norm_out``, ``conv_out`` (decoder: ``up.{i}`` with one
more res block per level).
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Encoder', 'Decoder']


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups (32 in every published tokenizer).  Narrow tokenizers want fewer: with 32
    channels and 32 groups it is an instance norm, which erases each image's colour level before ``conv_out``."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class Downsample2x(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 conv (asymmetric, as in taming/LDM)."""
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode='constant', value=0))


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int = None, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention: 1x1 conv to q,k,v, softmax(q.k / sqrt(C)), 1x1 projection, residual."""
    def __init__(self, in_channels: int, norm_groups: int = 32):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels, norm_groups)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)     # each B,C,HW
        w_BLL = torch.bmm(q.transpose(1, 2), k).mul_(self.w_ratio).softmax(dim=2)  # B,HW(q),HW(k)
        h_BCL = torch.bmm(v, w_BLL.transpose(1, 2))                              # B,C,HW(q)
        return x + self.proj_out(h_BCL.view(B, C, H, W))


def _level(block_in: int, block_out: int, n_blocks: int, with_attn: bool, dropout: float,
           norm_groups: int) -> Tuple[nn.Module, int]:
    """One resolution level under the published key names, and its output channels: ``.block`` (``n_blocks`` res
    blocks, the first ``block_in -> block_out``) and ``.attn`` (an attention block after each res block when
    ``with_attn``, else empty); built in the official order (same initialisation draws)."""
    block, attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout,
                                 norm_groups=norm_groups))
        block_in = block_out
        if with_attn:
            attn.append(AttnBlock(block_in, norm_groups))
    level = nn.Module()
    level.block, level.attn = block, attn
    return level, block_in


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The res blocks of a ``_level``, each followed by its attention block if the level has them."""
    for i_block, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


def _mid(block_in: int, using_mid_sa: bool, dropout: float, norm_groups: int) -> nn.Module:
    """``mid.block_1 / attn_1 / block_2`` of the encoder and the decoder (attention or identity)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
    mid.attn_1 = AttnBlock(block_in, norm_groups) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout, norm_groups=norm_groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, double_z=False, using_sa=True, using_mid_sa=True, norm_groups=32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down, block_in = _level(block_in, block_out, num_res_blocks,
                                    i_level == self.num_resolutions - 1 and using_sa, dropout, norm_groups)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)

        self.mid = _mid(block_in, using_mid_sa, dropout, norm_groups)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, using_sa=True, using_mid_sa=True, norm_groups=32):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[self.num_resolutions - 1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = _mid(block_in, using_mid_sa, dropout, norm_groups)

        ups = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up, block_in = _level(block_in, block_out, num_res_blocks + 1,
                                  i_level == self.num_resolutions - 1 and using_sa, dropout, norm_groups)
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            ups.insert(0, up)       # up[i] works at resolution level i, like down[i]
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            h = _run_level(up, h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
