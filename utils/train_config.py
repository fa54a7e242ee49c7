"""The training configuration: the flags of train.py / train_vae.py and the values derived from them, made once and
frozen (``Config``), and the plain dict of it that a checkpoint stores (``config_to_dict``; the ``'args'`` entry,
the same keys as the flags).  Nothing changes a ``Config`` after it is made: a trainer builds it from the parsed
flags, the process count and what it reads (the run's seed, the classes of the data), and passes it down."""
import argparse
import re
from typing import Any, Dict

from utils.arg_util import default_workers

__all__ = ['Config', 'config_to_dict', 'train_values', 'train_config', 'vae_config']

PATCH_SIZE = 16     # the published tokenizer's downsampling (train.py passes the one of --vae_ckpt)


class Config(argparse.Namespace):
    """A read-only namespace: ``cfg.depth``, ``vars(cfg)``; setting or deleting an attribute raises."""

    def __init__(self, **fields: Any):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any):
        raise AttributeError(f'the training configuration is made once and frozen: {name} cannot be set')

    def __delattr__(self, name: str):
        raise AttributeError(f'the training configuration is made once and frozen: {name} cannot be deleted')


def train_values(flags: argparse.Namespace, world_size: int, downsample: int = PATCH_SIZE) -> Dict[str, Any]:
    """What train.py derives from its flags (as the official ``init_dist_and_get_args``): image sides
    (``downsample``: the tokenizer's, 16 for the published one), per-rank batch, lr, warm-up, the TensorBoard name.
    A ``--bs`` too small for the processes raises ``ValueError``."""
    pn = '_'.join(map(str, flags.patch_nums))
    per_rank = flags.bs / flags.ac / world_size
    if per_rank < 1:
        raise ValueError(f'--bs {flags.bs} is too small for {world_size} processes x --ac {flags.ac}: '
                         f'each process needs at least one image per iteration')
    batch_size = max(1, round(per_rank))                    # images per rank per iteration
    glb_batch_size = batch_size * world_size                # images per iteration, all ranks
    # the official name tb-VARd{depth}__pn...; VIAR and FlexVAR runs are marked at the end
    name = (f'tb-VARd{flags.depth}__pn{pn}__b{glb_batch_size * flags.ac}ep{flags.ep}'
            f'adamlr{flags.tblr:g}wd{flags.twd:g}')
    name += f'__viar_p{flags.p_depth}' if flags.use_implicit else ''
    name += '__flexvar' if flags.flex else ''
    return dict(pn=pn, data_load_reso=downsample * flags.patch_nums[-1],
                resos=[downsample * p for p in flags.patch_nums], batch_size=batch_size, glb_batch_size=glb_batch_size,
                world_size=world_size, tlr=flags.ac * flags.tblr * glb_batch_size / 256, twde=flags.twde or flags.twd,
                wp=flags.wp or flags.ep / 50, workers=_workers(flags, batch_size),
                tb_name=re.sub(r'[^\w\-+,.]', '_', name))


def train_config(flags: argparse.Namespace, values: Dict[str, Any], **read: Any) -> Config:
    """train.py's configuration: the flags, ``values`` (``train_values``) and what was read after parsing
    (``seed``: the run's, ``num_classes``: from the data)."""
    return Config(**{**vars(flags), **values, **read})


def vae_config(flags: argparse.Namespace, world_size: int) -> Config:
    """train_vae.py's configuration: the flags (``parse_vae_args``) and the per-rank batch and loader workers."""
    batch_size = flags.bs // world_size
    return Config(**{**vars(flags), 'batch_size': batch_size, 'workers': _workers(flags, batch_size)})


def _workers(flags: argparse.Namespace, batch_size: int) -> int:
    return min(default_workers() if flags.workers < 0 else flags.workers, batch_size)


def config_to_dict(cfg: argparse.Namespace) -> dict:
    """``vars(cfg)`` with only plain values (loads with ``torch.load(weights_only=True)``): a checkpoint's
    ``'args'``."""
    out = {}
    for k, v in vars(cfg).items():
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, list) and all(
                isinstance(x, (bool, int, float, str)) for x in v)):
            out[k] = v
        else:
            out[k] = str(v)
    return out
