"""What training a tokenizer needs beyond ``VQVAE.forward`` / ``FlexVAE.forward`` (train_vae.py): the perceptual and
adversarial losses' networks, and the re-seeding of codebook entries that no scale uses."""
import os
from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from .errors import WeightsUnavailable
from .vqvae import VQVAE

__all__ = ['VGGPerceptual', 'PatchDiscriminator', 'restart_dead_codes']


class VGGPerceptual(nn.Module):
    """LPIPS-style distance on torchvision's ImageNet VGG16: unit-normalised features of relu1_2 ... relu5_3,
    squared differences averaged over space and channels, summed over the five layers (uniform layer weights:
    LPIPS's learned linear heads are another download)."""
    CUTS = (4, 9, 16, 23, 30)

    def __init__(self):
        super().__init__()
        import torchvision
        try:
            vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        except Exception as e:
            from torch.hub import get_dir
            raise WeightsUnavailable(f"the perceptual loss needs torchvision's VGG16 ImageNet weights "
                                     f"(vgg16-397923af.pth, 528 MB), which could not be loaded ({type(e).__name__}); "
                                     f"run once with internet access, or copy the file into "
                                     f"{os.path.join(get_dir(), 'checkpoints')}", fix='perceptual_weights') from e
        self.features = vgg.features[:self.CUTS[-1]].eval().requires_grad_(False)
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)         # always frozen, eval mode

    def forward(self, x, y):
        h = torch.cat([x, y]).add(1).mul(0.5).sub(self.mean).div(self.std)
        loss, start = 0, 0
        for cut in self.CUTS:
            h = self.features[start:cut](h)
            start = cut
            a, b = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            loss = loss + (a - b).square().mean()
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (3 stride-2 4x4 convs, GroupNorm, LeakyReLU): one real/fake logit per patch."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)], ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, f_BChw: torch.Tensor, gen: torch.Generator,
                       hits_SV: Optional[torch.Tensor] = None) -> int:
    """Codebook entries unused at every scale (EMA hits below 1 % of the uniform share) get random encoder vectors
    of this batch (the same on every rank: rank 0's batch is broadcast).  ``hits_SV``: the EMA hits per scale
    (default: the VQVAE's own ``ema_vocab_hit_SV``; FlexVAE's trainer keeps them itself).  Returns how many were
    re-seeded."""
    q = vae.quantize
    hits_V = (q.ema_vocab_hit_SV if hits_SV is None else hits_SV).sum(0)
    dead = hits_V <= 0.01 * hits_V.sum() / q.vocab_size      # all of them when nothing was hit yet
    dead = dead.nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z_NC = f_BChw.detach().float().permute(0, 2, 3, 1).reshape(-1, q.Cvae)
    pick = torch.randint(0, z_NC.shape[0], (dead.numel(),), generator=gen).to(z_NC.device)
    new = z_NC[pick] + 0.01 * z_NC.std() * torch.randn(dead.numel(), q.Cvae, generator=gen).to(z_NC.device)
    if tdist.is_available() and tdist.is_initialized():
        tdist.broadcast(new, 0)
    q.embedding.weight[dead] = new
    return int(dead.numel())
