"""Fetching the published checkpoints into ``ckpts/`` — only when a script's *default* path is asked for and missing.

``ensure_checkpoint('ckpts/<file>')`` returns the path when the file is there; when it is one of the published
files (``utils.zoo.MODELS``) at its default place ``ckpts/<file>`` and missing, it downloads it with
``huggingface_hub.hf_hub_download(repo_id, file, local_dir='ckpts')``.  Offline (``HF_HUB_OFFLINE=1``), without
``huggingface_hub`` or on any other failure it raises ``MissingCheckpointError`` (a ``UserError``) with the file, its
URL and the command that places it by hand.  A path the user chose (not the default) is never downloaded: a missing
one is an error.

Under ``torchrun`` only local rank 0 of each node downloads; the other ranks wait and then find the file.
"""
import os

from utils import dist
from utils.errors import UserError
from utils.zoo import CKPT_DIR, FLEX_TOKENIZER, MODELS, VAR_TOKENIZER, default_path, hf_url

__all__ = ['CKPT_DIR', 'FLEX_TOKENIZER', 'PUBLISHED', 'VAR_TOKENIZER', 'MissingCheckpointError', 'default_path',
           'ensure_checkpoint', 'hf_url', 'resolve_default']

REPO_CKPT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CKPT_DIR)   # the checkout's
# file name -> Hugging Face repository that publishes it (the registry utils.zoo.MODELS)
PUBLISHED: dict[str, str] = {name: entry.repo for name, entry in MODELS.items()}


class MissingCheckpointError(UserError):
    """A checkpoint file is not there and was not (or could not be) downloaded; the message says how to get it."""


def resolve_default(path: str | None) -> str | None:
    """A default checkpoint path ``ckpts/<published file>`` means the repository's ``ckpts/`` folder when the working
    directory has no ``ckpts/`` folder of its own: it is returned as that absolute path (a script run from elsewhere
    neither misses the files nor downloads them into a new ``<cwd>/ckpts``).  Any other path is returned as it is."""
    if not path or os.path.isabs(path) or os.path.exists(path) or os.path.isdir(CKPT_DIR):
        return path
    norm = os.path.normpath(path)
    if os.path.dirname(norm) != CKPT_DIR or os.path.basename(norm) not in PUBLISHED:
        return path
    repo_path = os.path.join(REPO_CKPT_DIR, os.path.basename(norm))
    return path if os.path.abspath(norm) == repo_path else repo_path


def _published_name(path: str, ckpt_dir: str) -> str | None:
    """The published file name when ``path`` is its default place ``<ckpt_dir>/<file>`` (or the repository's
    ``ckpts/<file>``), else None."""
    name = os.path.basename(path)
    if name in PUBLISHED and os.path.abspath(path) in (os.path.abspath(default_path(name, ckpt_dir)),
                                                       os.path.join(REPO_CKPT_DIR, name)):
        return name
    return None


def _manual_message(path: str, name: str, reason: str) -> str:
    url = hf_url(name)
    folder = os.path.dirname(path) or '.'
    return (f'checkpoint {path!r} is missing and could not be downloaded ({reason}): download {url} and place it at '
            f'{path!r}, e.g. `mkdir -p {folder} && wget -O {path} {url}` (see ckpts/README.md)')


def _reason(e: Exception) -> str:
    if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return 'HF_HUB_OFFLINE is set'
    if type(e).__name__ == 'LocalEntryNotFoundError':     # what hf_hub_download raises when the Hub is unreachable
        return 'huggingface.co cannot be reached'
    first = ' '.join(str(e).split()).split('. ')[0][:200]
    return f'{type(e).__name__}: {first}' if first else type(e).__name__


def _download(path: str, name: str) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise MissingCheckpointError(_manual_message(path, name, 'huggingface_hub is not installed')) from err
    url = hf_url(name)
    print(f'[download] {path} is missing: fetching {url} ...', flush=True)
    from huggingface_hub.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()        # its retry warnings would bury the one message below (progress bar kept)
    try:
        local_dir = os.path.normpath(os.path.dirname(path) or '.')      # './ckpts/x.pth' -> 'ckpts'
        got = hf_hub_download(repo_id=PUBLISHED[name], filename=name, local_dir=local_dir)
    except Exception as e:     # offline, no network, 404, disk full, interrupted ...: all end the same way
        raise MissingCheckpointError(_manual_message(path, name, _reason(e))) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if not os.path.isfile(path):
        if got and os.path.isfile(got):
            os.replace(got, path)
        else:
            raise MissingCheckpointError(_manual_message(path, name, f'the download did not produce {path!r}'))
    print(f'[download] saved {path} ({os.path.getsize(path) / 2 ** 20:,.1f} MiB)', flush=True)


def ensure_checkpoint(path: str, what: str = 'checkpoint', ckpt_dir: str = CKPT_DIR, download: bool = True) -> str:
    """Returns ``path`` once the file exists; downloads a missing published file at its default place.

    Raises ``MissingCheckpointError`` (one actionable sentence) when the file is missing and cannot be fetched, or when
    a non-default path does not exist.  ``download=False`` only checks that the path exists or can be downloaded
    (to reject a mistyped path before a long download of another file).  Call it on every rank: local rank 0
    downloads, the others wait."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise MissingCheckpointError(f'{what} {path!r} is a directory: pass the checkpoint file (.pth) itself')
    name = _published_name(path, ckpt_dir)
    if name is None:
        known = ', '.join(sorted(PUBLISHED))
        raise MissingCheckpointError(f'{what} {path!r} does not exist: check the path (the published checkpoints '
                                     f'{known} are downloaded automatically only to their default place '
                                     f'{ckpt_dir}/<file>)')
    if not download:
        return path
    error = None
    if dist.get_local_rank() == 0:
        try:
            _download(path, name)
        except MissingCheckpointError as e:
            error = e
    dist.barrier()
    if error is not None:
        raise error
    if not os.path.isfile(path):      # another rank's download failed; it reports the reason
        raise MissingCheckpointError(_manual_message(path, name, 'the download on local rank 0 failed'))
    return path
