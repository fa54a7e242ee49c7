"""Hub folders: a tokenizer and its transformer as ``config.json`` + ``model.safetensors`` + ``README.md``, no pickle.

``save_pretrained(vae, var, dir)`` writes one, ``from_pretrained(dir_or_repo_id)`` builds both models back (on
``meta``, weights assigned, as ``models.checkpoint.load_vae_var``), ``push_to_hub`` uploads one to the Hugging Face
Hub.  Every family round-trips: VAR (shared AdaLN or not), VIAR, FlexVAR and implicit FlexVAR.  The format, the
config's keys and the Hub's offline behaviour are described in docs/families.md ("Hub folders").
"""
import contextlib
import errno
import json
import os
import re
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from .checkpoint import (
    _load_strict,
    build_vae_from_config,
    build_var_from_config,
    describe_var_config,
    infer_vae_config,
    infer_var_config,
)
from .errors import HubError
from .flexvae import FlexVAE
from .var import VAR

__all__ = ['HUB_FILES', 'FORMAT', 'HubError', 'save_pretrained', 'from_pretrained', 'push_to_hub', 'hub_config',
           'read_hub_config', 'resolve_pretrained', 'family_of', 'sampler_defaults']

CONFIG, WEIGHTS, CARD = 'config.json', 'model.safetensors', 'README.md'
HUB_FILES = (CONFIG, WEIGHTS, CARD)
FORMAT, FORMAT_VERSION = 'viar-hub', 1
PREFIXES = ('vae.', 'var.')
REPO_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*')


# ================================ the config ==========================================================================
def family_of(var_cfg: Dict[str, Any]) -> str:
    """'VAR', 'VIAR', 'FlexVAR' or 'implicit FlexVAR' of a transformer config (``infer_var_config``)."""
    if var_cfg.get('flex'):
        return 'implicit FlexVAR' if var_cfg['use_implicit'] else 'FlexVAR'
    return 'VIAR' if var_cfg['use_implicit'] else 'VAR'


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(d))        # tuples -> lists, as read back


def _norm_groups(vae) -> int:
    return next((m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)), 32)


def hub_config(vae, var: VAR, sampler: Optional[Dict[str, Any]] = None, **card) -> Dict[str, Any]:
    """What rebuilds both models (read off their state dicts, as from a checkpoint file), with the sampling
    defaults (a plain dict, stored as given) and the model card's fields."""
    vae_sd, var_sd = vae.state_dict(), var.state_dict()
    if any(t.is_meta for t in (*vae_sd.values(), *var_sd.values())):
        raise HubError('the models have no weights (built on the meta device): load weights before saving them')
    tok = infer_vae_config(vae_sd, 'tokenizer', {'norm_groups': _norm_groups(vae)})
    tok['patch_nums'] = tuple(vae.v_patch_nums if isinstance(vae, FlexVAE) else vae.quantize.v_patch_nums)
    arch = infer_var_config(var_sd, 'transformer')
    if arch.get('flex'):
        arch['patch_nums'] = tuple(var.patch_nums)      # its default schedule (infer_var_config cannot tell)
    sampler = dict(sampler or {})
    try:
        json.dumps(sampler)
    except (TypeError, ValueError) as e:
        raise HubError(f'sampler defaults: {e}') from e
    params = {'tokenizer': sum(p.numel() for p in vae.parameters()),
              'transformer': sum(p.numel() for p in var.parameters())}
    return _jsonable(dict(format=FORMAT, format_version=FORMAT_VERSION, family=family_of(arch),
                          description=describe_var_config(arch), tokenizer=tok, transformer=arch,
                          sampler=sampler, parameters=params, card=card))


def _check_config(cfg: Any, where: str) -> Dict[str, Any]:
    if not isinstance(cfg, dict) or cfg.get('format') != FORMAT:
        raise HubError(f'{where} is not a hub folder config written by save_pretrained (no "format": "{FORMAT}")')
    if cfg.get('format_version', 0) > FORMAT_VERSION:
        raise HubError(f'{where} has format version {cfg["format_version"]}, newer than this code reads '
                       f'({FORMAT_VERSION}): update the code')
    missing = [k for k in ('tokenizer', 'transformer', 'sampler') if not isinstance(cfg.get(k), dict)]
    if missing:
        raise HubError(f'{where} lacks {", ".join(missing)}: write the folder again with save_pretrained')
    return cfg


# ================================ where a folder is ===================================================================
def _reason(e: Exception) -> str:
    """Why the Hub could not be reached, in a few words."""
    if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return 'HF_HUB_OFFLINE is set'
    if type(e).__name__ == 'LocalEntryNotFoundError':
        return 'huggingface.co cannot be reached'
    first = ' '.join(str(e).split()).split('. ')[0][:200]
    return f'{type(e).__name__}: {first}' if first else type(e).__name__


def _fetch_message(repo: str, reason: str) -> str:
    return (f'{repo!r} is no local folder, and as a Hugging Face Hub repository it could not be fetched ({reason}): '
            f'on a machine with internet run `hf download {repo} --local-dir DIR` (huggingface_hub), copy DIR here '
            f'and pass DIR instead')


def resolve_pretrained(path_or_repo_id: str, revision: Optional[str] = None) -> str:
    """The local folder of ``path_or_repo_id``: the folder itself, or a Hub repository's files downloaded (only
    ``HUB_FILES``) into huggingface_hub's cache.  Missing, unreachable or not a hub folder: one ``HubError`` line."""
    p = str(path_or_repo_id)
    if os.path.isdir(p):
        folder = p
    elif os.path.exists(p):
        raise HubError(f'{p!r} is a file, not a hub folder (config.json + model.safetensors)',
                       fix='pretrained_file')
    elif not REPO_ID.fullmatch(p) or p.startswith(('.', '~')):
        raise HubError(f'hub folder {p!r} not found (and not a Hub repository id like org/name)')
    else:
        folder = _download(p, revision)
    missing = [n for n in (CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise HubError(f'{p!r} is not a hub folder: {" and ".join(missing)} missing (write one with save_pretrained)',
                       fix='hub_folder')
    return folder


def _download(repo: str, revision: Optional[str]) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise HubError(_fetch_message(repo, 'huggingface_hub is not installed')) from err
    from huggingface_hub.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return snapshot_download(repo_id=repo, revision=revision, allow_patterns=list(HUB_FILES))
    except Exception as e:      # offline, unknown repository, gated, no network ...: one line
        raise HubError(_fetch_message(repo, _reason(e))) from e
    finally:
        hf_logging.set_verbosity(verbosity)


def read_hub_config(path_or_repo_id: str, revision: Optional[str] = None) -> Dict[str, Any]:
    """The checked ``config.json`` of a hub folder or repository."""
    folder = resolve_pretrained(path_or_repo_id, revision)
    where = os.path.join(folder, CONFIG)
    try:
        with open(where) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise HubError(f'{where} cannot be read ({e}): write the folder again with save_pretrained') from e
    return _check_config(cfg, where)


# ================================ saving ==============================================================================
def _atomic_write(path: str, write) -> None:
    """``write(temporary path)`` beside ``path``, then a rename over it: a failed write leaves the previous file as it
    was and no temporary file; a full disk is one HubError line."""
    tmp, existed = f'{os.path.join(os.path.dirname(path), "." + os.path.basename(path))}.{os.getpid()}.tmp', \
        os.path.exists(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f'the previous {os.path.basename(path)} is kept unchanged' if existed else 'nothing was written'
            raise HubError(f'disk full while writing {path} ({e.strerror}): {kept}') from e
        raise


def _write_bytes(data: bytes, tmp: str) -> None:
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _state_for_safetensors(vae, var) -> Dict[str, torch.Tensor]:
    """Both state dicts, prefixed 'vae.' / 'var.', on the CPU, contiguous, no two tensors sharing memory."""
    out, seen = {}, set()
    for prefix, model in zip(PREFIXES, (vae, var)):
        for k, t in model.state_dict().items():
            t = t.detach().to('cpu').contiguous()
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
            if key is not None and key in seen:
                t = t.clone()
            seen.add(key)
            out[prefix + k] = t
    return out


def _card(cfg: Dict[str, Any], folder: str) -> str:
    card, s, n = cfg['card'], cfg['sampler'], cfg['parameters']
    name = card.get('name') or os.path.basename(os.path.abspath(folder))
    flags = ' '.join(f'--{k} {v}' for k, v in (('cfg', s.get('cfg')), ('top_k', s.get('top_k')),
                                                ('top_p', s.get('top_p')))
                     if v is not None)
    if cfg['family'] in ('VIAR', 'implicit FlexVAR'):
        flags += ''.join(f' --{k} {s[k]}' for k in ('iter_left', 'iter_right') if s.get(k) is not None)
    lines = [
        '---', 'library_name: pytorch', 'tags:', '- image-generation', '- class-conditional',
        f'- {cfg["family"].replace(" ", "-").lower()}', f'license: {card.get("license", "mit")}', '---', '',
        f'# {name}', '', card.get('description') or f'{cfg["description"][0].upper()}{cfg["description"][1:]}, '
        f'class-conditional ({cfg["transformer"]["num_classes"]} classes), with its tokenizer.', '',
        f'- family: {cfg["family"]}',
        f'- parameters: transformer {n["transformer"]:,}, tokenizer {n["tokenizer"]:,}',
        f'- scales: {"_".join(map(str, cfg["transformer"]["patch_nums"]))}',
        f'- training data: {card.get("training_data", "unknown")}',
    ]
    lines += [f'- {k.replace("_", " ")}: {v}' for k, v in card.items()
              if k not in ('name', 'description', 'license', 'training_data')]
    lines += ['', '## Sampling', '', '```bash', f'python gen_img.py --pretrained {name} --class_label 207 --seeds 0 1 '
              f'{flags}'.rstrip(), '```', '', '```python', 'from models import from_pretrained',
              f'vae, var = from_pretrained({name!r})', '```', '',
              'Files: config.json (architecture and sampling defaults), model.safetensors (tokenizer `vae.*` and '
              'transformer `var.*` weights), this card. Written by `models.save_pretrained`.', '']
    return '\n'.join(lines)


def save_pretrained(vae, var: VAR, save_dir: str, sampler: Optional[Dict[str, Any]] = None, **card) -> str:
    """Writes the hub folder ``save_dir`` (created; a folder holding other files is refused): ``config.json``,
    ``model.safetensors`` and ``README.md``.  ``sampler``: the sampling defaults to record, a plain JSON-able dict
    (the scripts write ``SamplerSettings.to_dict()``; none: the readers' defaults); ``card``: fields of the model
    card (``name``, ``description``, ``training_data``, ``license``, anything else as a line).  Returns
    ``save_dir``."""
    from safetensors.torch import save_file
    if getattr(var, 'inference_dtype', None) is not None:
        raise HubError(f'this model was cast to {var.inference_dtype} for sampling (cast_for_inference): save it as '
                       f'loaded, before the cast, so that the folder holds the float32 weights')
    cfg = hub_config(vae, var, sampler, **card)
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise HubError(f'{save_dir!r} is a file: pass a new or empty folder')
    os.makedirs(save_dir, exist_ok=True)
    other = sorted(set(os.listdir(save_dir)) - set(HUB_FILES))
    if other:
        raise HubError(f'{save_dir!r} holds other files ({", ".join(other[:3])}{", ..." if len(other) > 3 else ""}):'
                       f' pass a new or empty folder')
    state = _state_for_safetensors(vae, var)
    _atomic_write(os.path.join(save_dir, WEIGHTS),
                  lambda tmp: save_file(state, tmp, metadata={'format': 'pt', 'family': cfg['family']}))
    config = (json.dumps(cfg, indent=2) + '\n').encode()
    _atomic_write(os.path.join(save_dir, CONFIG), lambda tmp: _write_bytes(config, tmp))
    _atomic_write(os.path.join(save_dir, CARD), lambda tmp: _write_bytes(_card(cfg, save_dir).encode(), tmp))
    return save_dir


def push_to_hub(vae, var: VAR, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                commit_message: str = 'Upload model with models.push_to_hub', revision: Optional[str] = None,
                sampler=None, **card) -> str:
    """``save_pretrained`` into a temporary folder, then ``huggingface_hub.HfApi().upload_folder`` of its three
    files to ``repo_id`` (created if needed).  Returns the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(vae, var, os.path.join(tmp, repo_id.split('/')[-1]), sampler=sampler,
                                 **{'name': repo_id, **card})
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, allow_patterns=list(HUB_FILES), repo_type='model')
    return str(getattr(info, 'commit_url', info))


# ================================ loading =============================================================================
def from_pretrained(path_or_repo_id: str, device='cpu', revision: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> Tuple[Any, VAR]:
    """(tokenizer, transformer) of a hub folder or a Hub repository id (downloaded through huggingface_hub's cache),
    in eval mode without gradients, in fp32 unless ``dtype`` is given.  The models are built on ``meta`` and the
    safetensors weights assigned (nothing initialised, nothing held twice)."""
    from safetensors.torch import load_file
    folder = resolve_pretrained(path_or_repo_id, revision)
    cfg = read_hub_config(folder)
    where = os.path.join(folder, WEIGHTS)
    try:
        flat = load_file(where, device='cpu')
    except Exception as e:      # truncated download, another kind of file
        raise HubError(f'{where} cannot be read as safetensors ({type(e).__name__}): download or save it again') \
            from e
    sds = {p: {k[len(p):]: v for k, v in flat.items() if k.startswith(p)} for p in PREFIXES}
    tok, arch = cfg['tokenizer'], cfg['transformer']
    try:
        vae = build_vae_from_config(tok, tok['patch_nums'])
        vae = _load_strict(vae, sds['vae.'], device, f'{where}: the tokenizer weights do not fit config.json ({{err}})')
        var = build_var_from_config(arch, vae)
        var = _load_strict(var, sds['var.'], device, f'{where}: the transformer weights do not fit config.json '
                                                     f'({{err}})')
    except (KeyError, TypeError) as e:
        raise HubError(f'{os.path.join(folder, CONFIG)} lacks or garbles {e}: write the folder again') from e
    if dtype is not None:
        vae, var = vae.to(dtype), var.to(dtype)
    return vae, var


def sampler_defaults(path_or_repo_id: str, revision: Optional[str] = None) -> Dict[str, Any]:
    """The sampling defaults a hub folder records (the plain dict ``save_pretrained`` was given)."""
    return read_hub_config(path_or_repo_id, revision)['sampler']

