"""The models' own errors: what is wrong with a checkpoint file, a hub folder or the architecture asked for.

Their messages name the file and what it holds, never a command-line flag: the scripts turn them into advice about
their flags (``utils/model_io.py``).  ``fix`` says which input to change, for that advice."""

__all__ = ['ModelError', 'CheckpointError', 'HubError', 'ArchitectureMismatch', 'WeightsUnavailable']


class ModelError(ValueError):
    """A file or request the models cannot serve.  ``fix``: what to change -- 'tokenizer' (another tokenizer file),
    'swapped' (tokenizer and transformer files exchanged), 'file' (another or a complete file), 'class_label',
    'hub_folder', 'pretrained_file' (a .pth passed as a hub folder) -- or None."""

    def __init__(self, message: str, fix=None, **facts):
        super().__init__(message)
        self.fix, self.facts = fix, facts       # facts: e.g. tokenizer='flex' / 'var' (which kind the file needs)


class CheckpointError(ModelError):
    """A checkpoint file that is missing, unreadable or does not fit what was asked."""


class HubError(CheckpointError):
    """A hub folder or repository that is missing, unreachable or not one ``save_pretrained`` wrote."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint holds another architecture than the one stated: ``key`` ('depth', 'flex', 'use_implicit' ...),
    what the file has (``found``) and what was asked (``wanted``); ``holds``: the file's model in words."""

    def __init__(self, message: str, key: str, found, wanted, holds: str):
        super().__init__(message, fix=key)
        self.key, self.found, self.wanted, self.holds = key, found, wanted, holds


class WeightsUnavailable(ModelError):
    """Pretrained weights a loss network needs (torchvision's VGG16) could not be loaded."""
