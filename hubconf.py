"""torch.hub entries: ``torch.hub.load('<repo or local checkout>', 'viar', source=..., pretrained=True)``.

Each returns ``(vae, var)``.  ``pretrained=True`` loads the published files (fetched from Hugging Face into
``ckpts/`` of the checkout when missing, see utils/download.py); ``pretrained=False`` builds the published shapes with
random weights (``device='meta'``: nothing allocated).  Hub folders written by ``models.save_pretrained`` load with
``models.from_pretrained`` instead.
"""
import os

dependencies = ['torch', 'numpy', 'safetensors']

HERE = os.path.dirname(os.path.abspath(__file__))


def _published(var_file: str, device, ckpt_dir):
    """The published transformer ``var_file`` and its tokenizer (the registry ``utils.zoo.MODELS``)."""
    from utils.zoo import MODELS
    vae_file = MODELS[var_file].tokenizer
    from models.checkpoint import load_vae_var
    from utils.download import default_path, ensure_checkpoint
    paths = [default_path(f, ckpt_dir) for f in (var_file, vae_file)]
    for p, what in zip(paths, ('model checkpoint', 'tokenizer checkpoint')):
        ensure_checkpoint(p, what, ckpt_dir=ckpt_dir)
    return load_vae_var(paths[1], paths[0], device=device)


def var(depth: int = 16, pretrained: bool = True, device='cpu', ckpt_dir: str = os.path.join(HERE, 'ckpts'), **kw):
    """VAR-d{16,20,24,30,36} (FoundationVision/var; d36: 512 px, shared AdaLN).  ``kw``: ``build_vae_var``'s
    arguments for ``pretrained=False``."""
    from models import PATCH_NUMS_512, build_vae_var
    if pretrained:
        if kw:
            raise TypeError(f'var(pretrained=True) takes no architecture arguments, got {sorted(kw)}')
        from utils.zoo import var_file
        return _published(var_file(depth), device, ckpt_dir)
    if depth == 36:
        kw = {'shared_aln': True, 'patch_nums': PATCH_NUMS_512, **kw}
    return build_vae_var(device=device, depth=depth, **kw)


def viar(pretrained: bool = True, device='cpu', ckpt_dir: str = os.path.join(HERE, 'ckpts'), **kw):
    """VIAR-d30 (mobiushy/VIAR: 5 pre + 1 implicit + 5 post blocks), with VAR's tokenizer."""
    from models import build_vae_var
    if pretrained:
        if kw:
            raise TypeError(f'viar(pretrained=True) takes no architecture arguments, got {sorted(kw)}')
        from utils.zoo import VIAR_MODEL
        return _published(VIAR_MODEL, device, ckpt_dir)
    return build_vae_var(device=device, **{'depth': 30, 'use_implicit': True, 'pre_depth': 5, 'post_depth': 5, **kw})


def flexvar(depth: int = 24, pretrained: bool = True, device='cpu', ckpt_dir: str = os.path.join(HERE, 'ckpts'),
            **kw):
    """FlexVAR-d{16,20,24} (jiaosiyu1999/FlexVAR) with its tokenizer FlexVAE."""
    from models import build_flexvar
    if pretrained:
        if kw:
            raise TypeError(f'flexvar(pretrained=True) takes no architecture arguments, got {sorted(kw)}')
        from utils.zoo import flex_models
        published = flex_models()
        if depth not in published:
            raise ValueError(f'FlexVAR publishes depths {sorted(published)}, not {depth}')
        return _published(published[depth].file, device, ckpt_dir)
    return build_flexvar(device=device, depth=depth, **kw)
