"""The multi-scale residual VQVAE tokenizer (VAR's published one): encoder -> quant_conv -> residual
quantiser over scales -> post_quant_conv -> decoder. Images are in [-1, 1]."""
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .basic_vae import Decoder, Encoder
from .quant import VectorQuantizer2

__all__ = ['VQVAE']


class VQVAE(nn.Module):
    def __init__(self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False,
                 quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                 v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode=True, ch_mult=(1, 1, 2, 2, 4),
                 num_res_blocks=2, using_sa=True, using_mid_sa=True, norm_groups=32):
        super().__init__()
        self.test_mode = test_mode
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.ch = ch
        # the conv net's shape (models.checkpoint.infer_vae_config reads all but norm_groups back from the keys)
        self.arch = dict(ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, using_sa=using_sa,
                         using_mid_sa=using_mid_sa, norm_groups=norm_groups)
        ddconfig = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=tuple(ch_mult),
                        num_res_blocks=num_res_blocks, using_sa=using_sa, using_mid_sa=using_mid_sa,
                        norm_groups=norm_groups)
        self.encoder = Encoder(double_z=False, **ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = VectorQuantizer2(
            vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
            default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums, quant_resi=quant_resi,
            share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    # -------------------------------------------- training (tokenizer) -----------------------------------------
    def forward(self, inp_B3HW: torch.Tensor, ret_usages: bool = False, quantize: bool = True):
        """-> (reconstruction, per-scale codebook usage % or None, vq loss).  ``quantize=False`` skips the quantiser
        (a plain autoencoder: the warm-up of ``train_vae.py --ae_warmup``)."""
        f = self.quant_conv(self.encoder(inp_B3HW))
        if not quantize:
            return self.decoder(self.post_quant_conv(f)), None, f.new_zeros(())
        f_hat, usages, vq_loss = self.quantize(f, ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    # -------------------------------------------- inference ----------------------------------------------------
    def img_to_f(self, inp_B3HW: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(inp_B3HW))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> List[torch.LongTensor]:
        f = self.img_to_f(inp_img_no_grad)
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one: bool = False):
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False):
        f = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f) if last_one else [self.fhat_to_img(f_hat) for f_hat in f]

    def img_to_reconstructed_img(self, x, v_patch_nums=None, last_one: bool = False):
        ls_f_hat = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(ls_f_hat[-1]) if last_one else [self.fhat_to_img(f_hat) for f_hat in ls_f_hat]

    # -------------------------------------------- checkpoints --------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False):
        """A stored ``quantize.ema_vocab_hit_SV`` made for another number of scales is replaced by our own."""
        key = 'quantize.ema_vocab_hit_SV'
        own = self.quantize.ema_vocab_hit_SV
        if key in state_dict and state_dict[key].shape[0] != own.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = torch.zeros(own.shape, dtype=torch.float32, device='cpu') if own.is_meta else own
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def init_weights(self):
        """PyTorch's default initialisation for every layer (for a tokenizer trained from scratch)."""
        for m in self.modules():
            if m is not self and hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        nn.init.uniform_(self.quantize.embedding.weight, -1 / self.vocab_size, 1 / self.vocab_size)
        self.quantize.ema_vocab_hit_SV.zero_()
