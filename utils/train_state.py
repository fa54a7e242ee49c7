"""The layout of the training checkpoints, written (``pack``) and read (``load``, ``unpack``) here alone.

    ar-ckpt-last.pth (train.py)   {'epoch', 'iter', 'args', 'resume', 'trainer': {'var_wo_ddp', 'vae_local',
                                   'var_opt': {'optimizer', 'scaler', 'grad_clip', 'n_gradient_accumulation'},
                                   'config': the model's description}}
    vae-ckpt-last.pth (train_vae.py)  {'epoch', 'iter', 'args', 'resume', 'vae_config',
                                   'trainer': {'vae_wo_ddp', 'vae_opt'[, 'disc', 'disc_opt']}}

``args`` is the run's configuration (``utils.train_config.config_to_dict``), ``resume`` what an exact resume needs
(RNG streams, sums, the best value ...).  The transformer's weights and description stay where the official
training checkpoints and ``models.checkpoint`` (sampling from a training checkpoint) have them.
"""
import os
from typing import NamedTuple, Optional

from models.checkpoint import read_checkpoint
from models.errors import ModelError
from utils.errors import UserError
from utils.model_io import CheckpointError
from utils.training import gather_object

__all__ = ['KINDS', 'Saved', 'load', 'pack', 'unpack']

KINDS = {'var': ('train.py', ('var_wo_ddp', 'var_opt')), 'vae': ('train_vae.py', ('vae_wo_ddp',))}   # writer, keys


class Saved(NamedTuple):
    """One training checkpoint by name."""
    epoch: int          # epochs done
    it: int             # iterations done in the next epoch
    weights: dict       # state dicts: var_wo_ddp, vae_local / vae_wo_ddp[, disc]
    optim: dict         # var: {'optimizer', 'scaler', 'grad_clip', 'n_gradient_accumulation'}; vae: vae_opt[, disc_opt]
    config: dict        # var: the model's description; vae: {'norm_groups'}
    args: dict          # the configuration it was trained with
    resume: dict        # what an exact resume needs


def pack(kind: str, s: Saved) -> dict:
    """The file's content for ``s`` (``kind``: 'var' or 'vae')."""
    if kind == 'var':
        trainer = {**s.weights, 'var_opt': s.optim, 'config': s.config}
        return {'epoch': s.epoch, 'iter': s.it, 'trainer': trainer, 'args': s.args, 'resume': s.resume}
    tr = {**s.weights, **s.optim}
    trainer = {k: tr[k] for k in ('vae_wo_ddp', 'vae_opt', 'disc', 'disc_opt') if k in tr}
    return {'epoch': s.epoch, 'iter': s.it, 'trainer': trainer, 'args': s.args, 'vae_config': s.config,
            'resume': s.resume}


def unpack(kind: str, ckpt: dict) -> Saved:
    """``pack``'s inverse."""
    tr = ckpt['trainer']
    if kind == 'var':
        weights = {k: v for k, v in tr.items() if k not in ('var_opt', 'config')}
        optim, config = tr['var_opt'], tr.get('config', {})
    else:
        weights = {k: v for k, v in tr.items() if k in ('vae_wo_ddp', 'disc')}
        optim, config = {k: v for k, v in tr.items() if k in ('vae_opt', 'disc_opt')}, ckpt.get('vae_config', {})
    return Saved(int(ckpt['epoch']), int(ckpt['iter']), weights, optim, config, ckpt['args'], ckpt.get('resume', {}))


def load(kind: str, path: str, damaged_hint: str = '') -> Optional[Saved]:
    """The run folder's training checkpoint ``path`` (None when there is none), read with ``weights_only=True``, the
    same on every rank; one CheckpointError sentence when it is unreadable or not one of ``kind``."""
    saved = _read(kind, path, damaged_hint)
    where = gather_object(None if saved is None else (saved.epoch, saved.it))
    if any(w != where[0] for w in where):
        raise UserError(f'the ranks see different checkpoints in {os.path.dirname(path)!r} ({where}): on several '
                        f'nodes, give every node the same run folder content (a shared filesystem)')
    return saved


def _read(kind: str, path: str, damaged_hint: str) -> Optional[Saved]:
    if not os.path.isfile(path):
        return None
    try:
        ckpt = read_checkpoint(path, 'training checkpoint')
    except ModelError as e:
        raise CheckpointError(f'cannot resume: {e}. Checkpoints are written atomically, so the file was damaged '
                              f'afterwards: restore it{damaged_hint}, or move it away to start over') from e
    writer, need = KINDS[kind]
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('trainer'), dict) and all(k in ckpt['trainer'] for k in need)
            and isinstance(ckpt.get('args'), dict) and 'epoch' in ckpt):
        raise CheckpointError(f'cannot resume: {path!r} is not a training checkpoint written by {writer}; move it away '
                              f'(or pass another --local_out_dir_path) to start a new run')
    return unpack(kind, ckpt)
