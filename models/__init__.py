"""Models: the multi-scale VQVAE tokenizer and the VAR / VIAR transformers; FlexVAR's tokenizer and transformer.

``build_vae_var`` keeps the official signature and defaults; ``build_flexvar`` builds FlexVAR (the layouts of its
published tokenizer and transformers, ``ckpts/README.md``), with an explicit or an implicit backbone; ``build_var``
builds the transformer of either family on an existing tokenizer.  ``device='meta'`` builds the models without
allocating or initialising any weight (a 2B-parameter checkpoint then loads with ``load_state_dict(...,
assign=True)``, see ``models.checkpoint``).  ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``: hub folders
(``models.hub``).
"""
from typing import Tuple

import torch

from .flexvae import FLEX_PATCH_NUMS, FlexVAE
from .flexvar import FlexVAR, flex_train_schedule, flex_train_schedule_for
from .quant import VectorQuantizer2
from .var import VAR, get_edit_mask, iterations_per_scale
from .vqvae import VQVAE

__all__ = ['VQVAE', 'VAR', 'VectorQuantizer2', 'build_vae_var', 'build_var', 'get_edit_mask', 'iterations_per_scale',
           'FlexVAE', 'FlexVAR', 'build_flexvar', 'flex_train_schedule', 'flex_train_schedule_for',
           'save_pretrained', 'from_pretrained', 'push_to_hub', 'load_vae_var']

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _build_transformer(cls, vae_local, depth: int, device, init_kw: dict, **model_kw) -> VAR:
    """``cls`` (VAR or a scale paradigm deriving from it) of width 64*depth, depth heads, drop-path 0.1*depth/24, built
    on ``meta``; on a real device materialised and given the fresh-training initialisation."""
    heads, width, dpr = depth, depth * 64, 0.1 * depth / 24
    with torch.device('meta'):
        var = cls(vae_local=vae_local, depth=depth, embed_dim=width, num_heads=heads, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=dpr, norm_eps=1e-6, cond_drop_rate=0.1, **model_kw)
    if torch.device(device).type != 'meta':
        var.to_empty(device=device)
        with torch.no_grad():
            var.init_weights(**init_kw)
    return var


def build_var(
    vae_local, depth=16, num_classes=1000, patch_nums=PATCH_NUMS_256, shared_aln=False, attn_l2_norm=True,
    flash_if_available=True, use_implicit=False, pre_depth=5, post_depth=5, device='meta',
    init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1, pos_grid=32,
) -> VAR:
    """The transformer on top of ``vae_local`` (held by reference): VAR / VIAR on a ``VQVAE``, FlexVAR on a
    ``FlexVAE`` (``patch_nums``: its default schedule; ``pos_grid``: its position grid's side).  Width 64*depth, depth
    heads, drop-path 0.1*depth/24.  Built on ``meta`` (nothing allocated: load a state dict with ``assign=True``); on
    a real device it gets the fresh-training initialisation (``init_weights``)."""
    flex = isinstance(vae_local, FlexVAE)
    return _build_transformer(
        FlexVAR if flex else VAR, vae_local, depth, device,
        dict(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std),
        num_classes=num_classes, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
        flash_if_available=flash_if_available, use_implicit=use_implicit, pre_depth=pre_depth, post_depth=post_depth,
        **(dict(pos_grid=pos_grid) if flex else {}))


def build_vae_var(
    # shared
    device='cpu', patch_nums=PATCH_NUMS_256,
    # tokenizer
    V=4096, Cvae=32, ch=160, share_quant_resi=4,
    # transformer
    num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True,
    flash_if_available=True, fused_if_available=True,
    init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,    # init_std < 0: sqrt(1 / 3C)
    # VIAR
    use_implicit=False, pre_depth=5, post_depth=5,
) -> Tuple[VQVAE, VAR]:
    """Builds (vae, var) with the official signature and defaults (``fused_if_available`` is accepted and unused: the
    fused-MLP kernel is not used here).

    The transformer gets the fresh-training initialisation (``init_weights``), the tokenizer PyTorch's default
    one (it is normally loaded from the published tokenizer).  With ``device='meta'`` nothing is allocated
    nor initialised.  Unlike the official function, no ``reset_parameters`` of torch.nn is monkey-patched.
    """
    with torch.device('meta'):      # build without allocating, then materialise once on the target device
        vae_local = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                          v_patch_nums=patch_nums)
    if torch.device(device).type != 'meta':
        vae_local.to_empty(device=device)
        with torch.no_grad():
            vae_local.init_weights()
    var_wo_ddp = build_var(vae_local, depth=depth, num_classes=num_classes, patch_nums=patch_nums,
                           shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available,
                           use_implicit=use_implicit, pre_depth=pre_depth, post_depth=post_depth, device=device,
                           init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                           init_std=init_std)
    return vae_local, var_wo_ddp


def build_flexvar(
    V=8912, Cvae=32, depth=16, num_classes=1000, device='cpu', patch_nums=FLEX_PATCH_NUMS,
    # tokenizer (the published one: LlamaGen VQ-16)
    ch=128, z_channels=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
    # transformer
    shared_aln=False, attn_l2_norm=True, flash_if_available=True, fused_if_available=True, pos_grid=32,
    init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,
    # implicit backbone
    use_implicit=False, pre_depth=5, post_depth=5,
) -> Tuple[FlexVAE, FlexVAR]:
    """(tokenizer, transformer) of FlexVAR with the published layouts (tokenizer and transformers);
    ``use_implicit=True`` swaps the ``depth`` blocks for VIAR's pre / implicit / post blocks (any schedule, and the
    per-scale iteration knob).  ``patch_nums``: the default schedule (the size of the stored mask buffer; every call
    may use another).  ``fused_if_available`` is accepted and unused.  Initialisation as ``build_vae_var``
    (tokenizer: PyTorch's default and a normalised uniform codebook); nothing is allocated with ``device='meta'``."""
    with torch.device('meta'):
        vae = FlexVAE(vocab_size=V, Cvae=Cvae, ch=ch, z_channels=z_channels, ch_mult=ch_mult,
                      num_res_blocks=num_res_blocks, v_patch_nums=patch_nums)
    if torch.device(device).type != 'meta':
        vae.to_empty(device=device)
        with torch.no_grad():
            vae.init_weights()
    var = build_var(vae, depth=depth, num_classes=num_classes, patch_nums=patch_nums, shared_aln=shared_aln,
                    attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available, use_implicit=use_implicit,
                    pre_depth=pre_depth, post_depth=post_depth, pos_grid=pos_grid, device=device,
                    init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return vae, var


from .checkpoint import load_vae_var  # noqa: E402  (checkpoint and hub build on the builders above)
from .hub import from_pretrained, push_to_hub, save_pretrained  # noqa: E402
