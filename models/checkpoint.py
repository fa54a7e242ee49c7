"""Loading checkpoints safely and building the model they describe.

* Files are read with ``torch.load(..., weights_only=True)``: a checkpoint from the internet cannot run code.
* A file may be a bare state dict (the published VAR, VIAR and tokenizer files) or a
  training checkpoint ``{'trainer': {'var_wo_ddp': ...}, ...}``.
* The architecture (VAR, VIAR or FlexVAR and its pre/post depth, depth, shared AdaLN, scales, classes; tokenizer
  kind, V, Cvae, ch, z_channels) is read from the state dict itself: FlexVAR's transformer has a 4-D position grid
  ``pos_1LC`` and no ``lvl_embed``, its published tokenizer (stored as ``{'model': state_dict}``) has
  ``quantize.codebook_used`` and ``encoder.conv_blocks.*``.  Where the caller also states it (``expect=``), a
  contradiction ends in one ``ArchitectureMismatch`` sentence naming the file and what it holds.
* A FlexVAR model samples any schedule; its default one (``var.patch_nums``) is the schedule a ``train.py --flex``
  training checkpoint records it was trained on (``trained_schedule``), the official 1_2_3_4_5_6_8_10_13_16 for a
  bare state dict (the published files).
* Models are built on the ``meta`` device and the weights assigned, so a 2B-parameter checkpoint is never
  initialised first (nor held twice in memory).
"""
import os
import pickle
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from . import PATCH_NUMS_256, PATCH_NUMS_512, build_var
from .errors import ArchitectureMismatch, CheckpointError
from .flexvae import FLEX_PATCH_NUMS, FlexVAE
from .var import VAR
from .vqvae import VQVAE

__all__ = ['CheckpointError', 'read_checkpoint', 'model_state_dict', 'infer_var_config', 'infer_vae_config',
           'tokenizer_downsample', 'describe_var_config', 'load_vae', 'load_var', 'load_vae_var', 'is_flexvar_state',
           'is_flexvae_state', 'trained_schedule', 'build_vae_from_config', 'build_var_from_config', 'class_names',
           'describe_classes', 'read_class_names', 'resolve_class_labels', 'check_expected']


def read_checkpoint(path: str, what: str = 'checkpoint', hint: str = '') -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped where possible), every failure turned into one
    CheckpointError sentence.  ``hint``: how to get the file, appended when it is missing."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{what} {path!r} not found' + (f'; {hint}' if hint else ''))
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:       # legacy (non-zip) files cannot be memory-mapped
            if 'mmap' not in str(e):
                raise
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e) and _is_torch_archive(path):
            raise CheckpointError(
                f'{what} {path!r} holds objects other than tensors and plain containers and was not loaded for safety '
                f'(weights_only=True); if you trust it, re-save its state dict with '
                f'torch.save(model.state_dict(), path)') from e
        raise _not_a_checkpoint(what, path) from e
    except Exception as err:       # truncated zip, text file, random bytes, legacy pickle ...: all the same to the user
        raise _not_a_checkpoint(what, path) from err


def _is_torch_archive(path: str) -> bool:
    """A zip archive that ``torch.save`` wrote (its records sit under ``<name>/data.pkl``) or a pickle stream (a
    legacy torch file): what a file with non-tensor objects looks like, as opposed to random bytes."""
    import zipfile
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith('data.pkl') for n in zf.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    with open(path, 'rb') as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _not_a_checkpoint(what: str, path: str) -> CheckpointError:
    size = os.path.getsize(path)
    return CheckpointError(f'{what} {path!r} ({size:,} bytes) is not a PyTorch checkpoint (truncated download or '
                           f'another kind of file?): download it again, or check the path')


def model_state_dict(obj: Any, path: str, key: str = 'var_wo_ddp') -> Dict[str, torch.Tensor]:
    """The model state dict in a bare state dict, in a training checkpoint ``{'trainer': {key: ...}}`` or in a
    LlamaGen-style file ``{'model': ...}`` (FlexVAR's published tokenizer)."""
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and key in obj['trainer']:
        obj = obj['trainer'][key]
    elif isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        obj = obj['model']
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{path!r} is a PyTorch file but not a model state dict nor a training checkpoint '
                              f"with ['trainer']['{key}']")
    return obj


# ---------------------------------------------------------------------------------------------------------------------
def _patch_nums_for(sd: Dict[str, torch.Tensor], path: str) -> Tuple[int, ...]:
    """The scales, read off the ``lvl_1L`` buffer (the scale index of each of the L tokens: pn*pn of each)."""
    K, L = sd['lvl_embed.weight'].shape[0], sd['pos_1LC'].shape[1]
    lvl = sd.get('lvl_1L')
    if lvl is not None and lvl.numel() == L and not lvl.is_meta:
        counts = torch.bincount(lvl.reshape(-1).long(), minlength=K).tolist()
        pns = tuple(round(c ** 0.5) for c in counts)
        if len(counts) == K and all(p * p == c for p, c in zip(pns, counts)):
            return pns
    for pns in (PATCH_NUMS_256, PATCH_NUMS_512):
        if sum(p * p for p in pns) == L and len(pns) == K:
            return pns
    raise CheckpointError(f'{path!r} has {K} scales and {L} tokens, but no readable lvl_1L buffer to tell which; '
                          f'build it with build_vae_var(patch_nums=...) yourself')


def trained_schedule(obj: Any) -> Optional[Tuple[int, ...]]:
    """The scales a ``train.py`` training checkpoint was trained on (``['trainer']['config']['patch_nums']``, else
    ``['args']['patch_nums']``): a FlexVAR model's own default schedule.  None for a bare state dict (a published file)
    or when no valid schedule (increasing positive sides) is recorded."""
    if not isinstance(obj, dict) or not isinstance(obj.get('trainer'), dict):
        return None
    config, args = obj['trainer'].get('config'), obj.get('args')
    for rec in (config, args):
        pns = rec.get('patch_nums') if isinstance(rec, dict) else None
        if isinstance(pns, (list, tuple)) and pns and all(isinstance(p, int) and not isinstance(p, bool) for p in pns) \
                and pns[0] >= 1 and all(b > a for a, b in zip(pns, pns[1:])):
            return tuple(pns)
    return None


def class_names(obj: Any) -> Optional[Tuple[str, ...]]:
    """The class folder name of every label (index -> name) that a ``train.py`` training checkpoint records
    (``['trainer']['config']['class_names']``: the sorted class folders of its data set), or None (a bare state dict:
    the published ImageNet files, whose labels are ImageNet's class indices)."""
    if not isinstance(obj, dict) or not isinstance(obj.get('trainer'), dict):
        return None
    names = (obj['trainer'].get('config') or {}).get('class_names')
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def describe_classes(names: Sequence[str], shown: int = 32) -> str:
    """'0 cats, 1 dogs, ...': the label of every class folder (the first ``shown`` of a long list)."""
    text = ', '.join(f'{i} {n}' for i, n in enumerate(names[:shown]))
    return text + (f', ... ({len(names)} classes)' if len(names) > shown else '')


def read_class_names(path: str) -> Optional[Tuple[str, ...]]:
    """``class_names`` of the checkpoint file ``path`` (None when it records none)."""
    return class_names(read_checkpoint(path, 'model checkpoint'))


def resolve_class_labels(labels: Sequence[Union[int, str]], names: Optional[Sequence[str]], num_classes: int,
                         what: str = 'class label', path: str = 'the checkpoint') -> list:
    """Class indices of ``labels``: numbers (``'207'``) are indices, anything else a class folder name of ``names``
    (``'cats'``; the checkpoint's ``class_names``).  One CheckpointError line for an unknown name or an index out of
    range."""
    out = []
    for lab in labels:
        text = str(lab).strip()
        if text.lstrip('-').isdigit():
            c = int(text)
        elif names and text in names:
            c = list(names).index(text)
        elif names:
            shown = ', '.join(names[:20]) + (', ...' if len(names) > 20 else '')
            raise CheckpointError(f'{what} {text!r} is not a class of {path} (its classes: {shown})', fix='class_label')
        else:
            raise CheckpointError(f'{what} {text!r}: {path} records no class names (a published checkpoint, or one '
                                  f'trained before they were stored): pass class indices', fix='class_label')
        if not 0 <= c < num_classes:
            raise CheckpointError(f'{what} {c} out of range: {path} has classes 0..{num_classes - 1}',
                                  fix='class_label')
        out.append(c)
    return out


def is_flexvar_state(sd: Dict[str, torch.Tensor]) -> bool:
    """FlexVAR's transformer: a 4-D position grid ``pos_1LC`` (1, C, 32, 32) and no level embedding."""
    pos = sd.get('pos_1LC')
    return isinstance(pos, torch.Tensor) and pos.dim() == 4 and 'lvl_embed.weight' not in sd


def is_flexvae_state(sd: Dict[str, torch.Tensor]) -> bool:
    """FlexVAR's tokenizer (LlamaGen VQ-16 layout)."""
    return 'quantize.codebook_used' in sd or any(k.startswith('encoder.conv_blocks.') for k in sd)


def infer_var_config(sd: Dict[str, torch.Tensor], path: str = 'checkpoint') -> Dict[str, Any]:
    """Architecture of a VAR / VIAR state dict, as keyword arguments of ``build_vae_var``; of a FlexVAR one (explicit
    or implicit backbone), keyword arguments of ``build_flexvar`` plus ``flex=True``."""
    flex = is_flexvar_state(sd)
    need = ('class_emb.weight', 'pos_1LC', 'word_embed.weight', 'head.weight') + (() if flex else ('lvl_embed.weight',))
    if not all(k in sd for k in need):
        if 'quantize.embedding.weight' in sd:
            raise CheckpointError(f'{path!r} is a tokenizer (VQVAE) checkpoint, not a VAR/VIAR one', fix='swapped')
        missing = [k for k in need if k not in sd]
        raise CheckpointError(f'{path!r} is not a VAR/VIAR/FlexVAR checkpoint (missing {missing})')
    C = sd['class_emb.weight'].shape[1]
    use_implicit = 'implicit_block.attn.mat_qkv.weight' in sd

    def count(prefix):
        return len({k.split('.')[1] for k in sd if k.startswith(prefix + '.')})
    cfg = dict(
        depth=C // 64, num_classes=sd['class_emb.weight'].shape[0] - 1,
        patch_nums=FLEX_PATCH_NUMS if flex else _patch_nums_for(sd, path),
        shared_aln='shared_ada_lin.1.weight' in sd,
        attn_l2_norm=any(k.endswith('attn.scale_mul_1H11') for k in sd),
        use_implicit=use_implicit,
        pre_depth=count('pre_blocks') if use_implicit else 0,
        post_depth=count('post_blocks') if use_implicit else 0,
        V=sd['head.weight'].shape[0], Cvae=sd['word_embed.weight'].shape[1],
    )
    if flex:
        cfg.update(flex=True, pos_grid=sd['pos_1LC'].shape[-1])
    if C % 64:
        raise CheckpointError(f'{path!r} has width {C}, not a multiple of 64 (width = 64 x depth)')
    if not use_implicit and count('blocks') != cfg['depth']:
        raise CheckpointError(f'{path!r} has {count("blocks")} blocks of width {C}; VAR models have width 64 x depth')
    return cfg


def describe_var_config(cfg: Dict[str, Any]) -> str:
    if cfg.get('flex'):
        if cfg['use_implicit']:
            return (f"an implicit FlexVAR model (depth {cfg['depth']}: {cfg['pre_depth']} pre + 1 implicit + "
                    f"{cfg['post_depth']} post blocks)")
        return f"a FlexVAR model (depth {cfg['depth']}{', shared AdaLN' if cfg['shared_aln'] else ''})"
    if cfg['use_implicit']:
        return (f"a VIAR model (depth {cfg['depth']}: {cfg['pre_depth']} pre + 1 implicit + {cfg['post_depth']} post "
                f"blocks)")
    return f"a VAR model (depth {cfg['depth']}{', shared AdaLN' if cfg['shared_aln'] else ''})"


def infer_vae_config(sd: Dict[str, torch.Tensor], path: str = 'checkpoint',
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The VQVAE constructor arguments of a tokenizer state dict: vocabulary, code width, base width, shared phi
    convs, and the conv net's shape (levels and width multipliers, residual blocks per level, attention), all read
    from the keys.  ``extra`` holds what keys cannot tell (``norm_groups``; 32 when absent, as published).
    FlexVAR's tokenizer: ``FlexVAE`` arguments plus ``flex=True``."""
    if is_flexvae_state(sd):
        return _infer_flexvae_config(sd, path, extra)
    if 'quantize.embedding.weight' not in sd or 'encoder.conv_in.weight' not in sd:
        if 'class_emb.weight' in sd:
            raise CheckpointError(f'{path!r} is a VAR/VIAR transformer checkpoint, not a tokenizer', fix='swapped')
        raise CheckpointError(f'{path!r} is not a tokenizer (VQVAE) checkpoint')
    V, Cvae = sd['quantize.embedding.weight'].shape
    ch = sd['encoder.conv_in.weight'].shape[0]
    n_phi = len({k.split('.')[3] for k in sd if k.startswith('quantize.quant_resi.qresi_ls.')})
    levels = sorted({int(k.split('.')[2]) for k in sd if k.startswith('decoder.up.')})
    try:
        ch_mult = tuple(sd[f'decoder.up.{i}.block.0.conv1.weight'].shape[0] // ch for i in levels)
        blocks = {int(k.split('.')[4]) for k in sd if k.startswith(f'decoder.up.{levels[0]}.block.')}
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f'{path!r} is not a complete tokenizer (VQVAE) checkpoint: decoder blocks are '
                              f'missing') from e
    cfg = dict(V=V, Cvae=Cvae, ch=ch, share_quant_resi=n_phi or 1, ch_mult=ch_mult, num_res_blocks=len(blocks) - 1,
               using_sa=any(k.startswith(f'decoder.up.{levels[-1]}.attn.') for k in sd),
               using_mid_sa=any(k.startswith('decoder.mid.attn_1.') for k in sd), norm_groups=32)
    cfg.update({k: v for k, v in (extra or {}).items() if k == 'norm_groups'})
    return cfg


def _infer_flexvae_config(sd: Dict[str, torch.Tensor], path: str,
                          extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """V, Cvae, base width ``ch``, ``z_channels`` and the conv net's shape of a FlexVAE (LlamaGen VQ-16) state dict;
    ``norm_groups`` from ``extra`` (32 when absent, as published)."""
    try:
        V, Cvae = sd['quantize.embedding.weight'].shape
        ch = sd['encoder.conv_in.weight'].shape[0]
        levels = sorted({int(k.split('.')[2]) for k in sd if k.startswith('encoder.conv_blocks.')})
        ch_mult = tuple(sd[f'encoder.conv_blocks.{i}.res.0.conv1.weight'].shape[0] // ch for i in levels)
        blocks = {k.split('.')[4] for k in sd if k.startswith('encoder.conv_blocks.0.res.')}
        z_channels = sd['quant_conv.weight'].shape[1]
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f'{path!r} is not a complete FlexVAR tokenizer (FlexVAE) checkpoint: '
                              f'the encoder, quant_conv or codebook is missing') from e
    cfg = dict(flex=True, V=V, Cvae=Cvae, ch=ch, z_channels=z_channels, ch_mult=ch_mult, num_res_blocks=len(blocks),
               norm_groups=32)
    cfg.update({k: v for k, v in (extra or {}).items() if k == 'norm_groups'})
    return cfg


def _tokenizer_config(vae_ckpt: str, hint: str = ''):
    """(state dict, tokenizer config) of a tokenizer file: a bare state dict, ``{'model': state dict}`` (FlexVAR's),
    or a training checkpoint with ['trainer']['vae_wo_ddp'] (train_vae.py) or ['vae_local'] (train.py); a
    'vae_config' beside the weights (train_vae.py's exports) says what the keys cannot."""
    obj = read_checkpoint(vae_ckpt, 'tokenizer checkpoint', hint)
    extra = obj.get('vae_config') if isinstance(obj, dict) and isinstance(obj.get('vae_config'), dict) else None
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict):
        obj = obj['trainer'].get('vae_wo_ddp', obj['trainer'].get('vae_local', obj))
    sd = model_state_dict(obj, vae_ckpt)
    return sd, infer_vae_config(sd, vae_ckpt, extra)


def tokenizer_downsample(vae_ckpt: str, default: int = 16) -> int:
    """Image side / token-map side of the tokenizer in ``vae_ckpt`` (16 for the published one); ``default`` when
    the file cannot be read (the caller's later ``load_vae`` then reports why)."""
    try:
        return 2 ** (len(_tokenizer_config(vae_ckpt)[1]['ch_mult']) - 1)
    except CheckpointError:
        return default


def check_expected(cfg: Dict[str, Any], expect: Optional[Dict[str, Any]], path: str):
    """Raises ``ArchitectureMismatch`` when a stated architecture (``expect``, None values ignored) contradicts the
    checkpoint's ``cfg``.  ``flex``: whether a FlexVAR model was asked for (VAR/VIAR configs have no such key:
    False)."""
    holds = describe_var_config(cfg)
    for key, want in (expect or {}).items():
        if key == 'flex' and want is not None and bool(cfg.get('flex')) != bool(want):
            asked = 'FlexVAR' if want else 'VAR/VIAR'
            raise ArchitectureMismatch(f'{path!r} holds {holds}, but {asked} was asked for', key, bool(cfg.get('flex')),
                                       bool(want), holds)
        if want is None or key not in cfg or cfg[key] == want:
            continue
        if key in ('pre_depth', 'post_depth') and not cfg['use_implicit']:
            continue
        if key == 'use_implicit':
            if cfg.get('flex'):
                asked = 'an implicit FlexVAR' if want else 'an explicit FlexVAR'
            else:
                asked = 'VIAR' if want else 'VAR'
            raise ArchitectureMismatch(f'{path!r} holds {holds}, but {asked} was asked for', key, cfg[key], want, holds)
        raise ArchitectureMismatch(f'{path!r} holds {holds} with {key}={cfg[key]}, but {key}={want} was asked for',
                                   key, cfg[key], want, holds)


# ---------------------------------------------------------------------------------------------------------------------
def _float32(sd):
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in sd.items()}


def load_vae(vae_ckpt: str, device='cpu', patch_nums=PATCH_NUMS_256, hint: str = '') -> Union[VQVAE, FlexVAE]:
    """The tokenizer of ``vae_ckpt`` (bare state dict, ``{'model': ...}`` or a training checkpoint with
    ['trainer']['vae_wo_ddp']), in eval mode without gradients: VAR's VQVAE or FlexVAR's FlexVAE, from its keys."""
    sd, cfg = _tokenizer_config(vae_ckpt, hint)
    kind = 'FlexVAE' if cfg.get('flex') else 'VQVAE'
    return _load_strict(build_vae_from_config(cfg, patch_nums), sd, device,
                        f'tokenizer checkpoint {vae_ckpt!r} does not fit the {kind} architecture ({{err}})')


def build_vae_from_config(cfg: Dict[str, Any], patch_nums=PATCH_NUMS_256) -> Union[VQVAE, FlexVAE]:
    """The tokenizer a config of ``infer_vae_config`` describes, built on ``meta`` (load its weights with
    ``assign=True``)."""
    with torch.device('meta'):
        if cfg.get('flex'):
            return FlexVAE(vocab_size=cfg['V'], Cvae=cfg['Cvae'], ch=cfg['ch'], z_channels=cfg['z_channels'],
                           ch_mult=tuple(cfg['ch_mult']), num_res_blocks=cfg['num_res_blocks'],
                           norm_groups=cfg['norm_groups'], v_patch_nums=tuple(patch_nums))
        return VQVAE(vocab_size=cfg['V'], z_channels=cfg['Cvae'], ch=cfg['ch'], test_mode=True,
                     share_quant_resi=cfg['share_quant_resi'], v_patch_nums=tuple(patch_nums),
                     ch_mult=tuple(cfg['ch_mult']), num_res_blocks=cfg['num_res_blocks'], using_sa=cfg['using_sa'],
                     using_mid_sa=cfg['using_mid_sa'], norm_groups=cfg['norm_groups'])


def build_var_from_config(cfg: Dict[str, Any], vae: Union[VQVAE, FlexVAE]) -> VAR:
    """The transformer a config of ``infer_var_config`` describes, on top of ``vae``, built on ``meta``."""
    arch = dict(num_classes=cfg['num_classes'], patch_nums=tuple(cfg['patch_nums']), shared_aln=cfg['shared_aln'],
                attn_l2_norm=cfg['attn_l2_norm'], use_implicit=cfg['use_implicit'],
                pre_depth=cfg['pre_depth'] or 5, post_depth=cfg['post_depth'] or 5)
    return build_var(vae, depth=cfg['depth'], pos_grid=cfg.get('pos_grid', 32), **arch)


def _load_strict(model: torch.nn.Module, sd, device, message: str):
    """Loads ``sd`` into the meta-built ``model`` (strict, tensors assigned in fp32) and returns it on ``device`` in
    eval mode without gradients; a mismatch raises CheckpointError(message with ``{err}`` = torch's first line)."""
    try:
        model.load_state_dict(_float32(sd), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(message.replace('{err}', str(e).splitlines()[0])) from e
    return model.to(device).eval().requires_grad_(False)


def load_var(var_ckpt: str, vae: Union[VQVAE, FlexVAE], device='cpu', expect: Optional[Dict[str, Any]] = None,
             hint: str = '', state_dict=None,
             schedule: Optional[Sequence[int]] = None) -> VAR:
    """The VAR/VIAR/FlexVAR model of ``var_ckpt`` on top of ``vae`` (eval mode, no gradients).

    ``expect``: architecture the caller states, e.g. ``{'depth': 30, 'use_implicit': True}`` (None = not stated);
    a contradiction raises ``ArchitectureMismatch``.  ``schedule``: a FlexVAR model's default schedule
    (``var.patch_nums``: what sampling uses when no schedule is given); when not given, the
    scales a ``train.py --flex`` checkpoint was trained on (``trained_schedule``), else FlexVAR's official
    1_2_3_4_5_6_8_10_13_16 (the published files)."""
    names = None
    if state_dict is None:
        obj = read_checkpoint(var_ckpt, 'model checkpoint', hint)
        sd, schedule, names = model_state_dict(obj, var_ckpt), schedule or trained_schedule(obj), class_names(obj)
    else:
        sd = state_dict
    var = _load_var(var_ckpt, vae, device, expect, sd, schedule)
    var.class_names = names         # label -> class folder name (``class_names``), None when not recorded
    return var


def _load_var(var_ckpt, vae, device, expect, sd, schedule):
    cfg = infer_var_config(sd, var_ckpt)
    if cfg.get('flex') and schedule:
        cfg['patch_nums'] = tuple(schedule)
    check_expected(cfg, expect, var_ckpt)
    flex = bool(cfg.get('flex'))
    if flex != isinstance(vae, FlexVAE):
        need, given = ("FlexVAR's tokenizer (a FlexVAE)", "VAR's multi-scale VQVAE") if flex else \
            ("VAR's multi-scale VQVAE", "FlexVAR's FlexVAE")
        raise CheckpointError(f'{var_ckpt!r} holds {describe_var_config(cfg)}, which needs {need}, but the tokenizer '
                              f'given is {given}', fix='tokenizer', tokenizer='flex' if flex else 'var')
    if (cfg['V'], cfg['Cvae']) != (vae.vocab_size, vae.Cvae):
        raise CheckpointError(f'{var_ckpt!r} was trained on a tokenizer with V={cfg["V"]}, Cvae={cfg["Cvae"]}, but the '
                              f'tokenizer given has V={vae.vocab_size}, Cvae={vae.Cvae}', fix='tokenizer')
    if not flex and tuple(vae.quantize.v_patch_nums) != tuple(cfg['patch_nums']):
        raise CheckpointError(f'{var_ckpt!r} uses scales {cfg["patch_nums"]}, the tokenizer was built for '
                              f'{vae.quantize.v_patch_nums}: load the tokenizer with patch_nums={cfg["patch_nums"]}')
    return _load_strict(build_var_from_config(cfg, vae), sd, device,
                        f'{var_ckpt!r} does not fit {describe_var_config(cfg)} ({{err}}); is the file complete?')


def load_vae_var(vae_ckpt: str, var_ckpt: str, device='cpu', expect: Optional[Dict[str, Any]] = None,
                 vae_hint: str = '', var_hint: str = '') -> Tuple[Union[VQVAE, FlexVAE], VAR]:
    """Tokenizer and transformer from their checkpoints, architecture read from the files (see module doc): VAR's
    VQVAE with a VAR/VIAR model, or FlexVAR's FlexVAE with a FlexVAR model (explicit or implicit backbone), whose
    default schedule is the one a ``train.py --flex`` checkpoint was trained on (the official 10 scales for a
    published file; see ``load_var``)."""
    obj = read_checkpoint(var_ckpt, 'model checkpoint', var_hint)
    sd = model_state_dict(obj, var_ckpt)
    cfg = infer_var_config(sd, var_ckpt)
    check_expected(cfg, expect, var_ckpt)
    schedule = trained_schedule(obj) if cfg.get('flex') else None
    vae = load_vae(vae_ckpt, device, patch_nums=schedule or cfg['patch_nums'], hint=vae_hint)
    var = load_var(var_ckpt, vae, device, expect=None, state_dict=sd, schedule=schedule)
    var.class_names = class_names(obj)      # label -> class folder name of a train.py checkpoint, else None
    return vae, var
