"""The scripts' side of ``models``' errors and hub folders (application layer).

``models`` raises ``models.errors.ModelError``s that say what is wrong with a file or the architecture asked for;
``model_errors(flags)`` turns them into one-line ``CheckpointError``s (a ``UserError``) that also say which flag to
change.  ``hub_sampler_settings`` reads a hub folder's sampling defaults as ``SamplerSettings``."""
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from models.errors import ArchitectureMismatch, HubError, ModelError
from utils.errors import UserError
from utils.sampler_settings import SamplerSettings, SettingsError
from utils.zoo import FLEX_TOKENIZER, VAR_TOKENIZER

__all__ = ['CheckpointError', 'advice', 'model_errors', 'hub_sampler_settings']


class CheckpointError(UserError):
    """A checkpoint or hub folder that is missing, unreadable or does not fit the command; the message says what to
    do."""


# what to do about a ModelError, by its ``fix``
ADVICE = {
    'tokenizer': 'pass the matching --vae_ckpt',
    'swapped': 'pass the tokenizer as --vae_ckpt and the transformer checkpoint as the model',
    'pretrained_file': 'pass a hub folder, or use --var_ckpt/--vae_ckpt for .pth checkpoints',
    'hub_folder': 'or convert a checkpoint with python -m scripts.convert',
    'perceptual_weights': 'or pass --lp 0 (no perceptual loss)',
}


def advice(e: ModelError, flags: Optional[Dict[str, str]] = None) -> str:
    """The flag advice for ``e`` ('' when its message says it all); ``flags``: the command-line flag of each
    architecture key (default ``--key``)."""
    if isinstance(e, ArchitectureMismatch):
        flag = (flags or {}).get(e.key, f'--{e.key}')
        if isinstance(e.found, bool):       # a switch: --flex, --use_implicit
            return f'{"add" if e.found else "drop"} {flag}, or pass the matching checkpoint'
        return f'pass {flag} {e.found} (or leave it out), or pass the matching checkpoint'
    kind = e.facts.get('tokenizer')
    if e.fix == 'tokenizer' and kind:
        return f'pass {FLEX_TOKENIZER if kind == "flex" else VAR_TOKENIZER} (or your own of that kind) as --vae_ckpt'
    return ADVICE.get(e.fix, '')


@contextmanager
def model_errors(flags: Optional[Dict[str, str]] = None) -> Iterator[None]:
    """Runs the block; a ``ModelError`` in it becomes one ``CheckpointError`` line: its message and the advice."""
    try:
        yield
    except ModelError as e:
        tip = advice(e, flags)
        raise CheckpointError(f'{e}: {tip}' if tip else str(e)) from e


def hub_sampler_settings(path_or_repo_id: str, revision: Optional[str] = None) -> SamplerSettings:
    """The sampling defaults a hub folder records, as ``SamplerSettings`` (none recorded: the scripts' defaults)."""
    from models.hub import sampler_defaults
    with model_errors():
        try:
            return SamplerSettings.from_dict(sampler_defaults(path_or_repo_id, revision))
        except SettingsError as e:
            raise HubError(f'{path_or_repo_id!r}: config.json sampler: {e}') from e
