"""Command-line vocabulary shared by every script (ground floor: imports no model, no torch).

Booleans (``str2bool``, ``BOOL``), the parser class that stays quiet on the non-zero ranks of ``torchrun``
(``Parser``), and one parser per meaning of a schedule:

* ``parse_scales``: token-map sides of VAR's ``--pn`` (presets ``VAR_SCALE_PRESETS``) or of FlexVAR's ``--infer_pn``
  (presets ``FLEX_SCHEDULE_PRESETS``; '512' is a different schedule there), ``_`` or ``-`` separated;
* ``parse_iterations``: VIAR's implicit iterations per scale, ``LEFT-RIGHT`` (also ``->``, ``→``, ``:``).

Each raises ``ValueError`` with one sentence; the scripts turn it into their own error.
"""
import argparse
import os
import re
import sys
from typing import Mapping, Optional, Tuple

__all__ = ['BOOL', 'FLEX_SCHEDULE_PRESETS', 'Parser', 'VAR_SCALE_PRESETS', 'parse_iterations', 'parse_scales',
           'schedule_name', 'str2bool']

# VAR's scales (train.py / train_vae.py --pn): the published 256 px and 512 px models' token-map sides
VAR_SCALE_PRESETS: Mapping[str, Tuple[int, ...]] = {'256': (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                                    '512': (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
# FlexVAR's inference schedules (--infer_pn): the official default (256 px) and the official 512 px zero-shot
# schedule (FlexVAR README, scripts/evaluate_c2i.sh) -- not VAR's 512 px scales
FLEX_SCHEDULE_PRESETS: Mapping[str, Tuple[int, ...]] = {
    '256': (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), '512': (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32)}


def str2bool(v) -> bool:
    """``True/False``, ``1/0``, ``yes/no``, ``on/off`` ... (any case) -> bool."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('1', 'true', 't', 'yes', 'y', 'on'):
        return True
    if s in ('0', 'false', 'f', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (True/False/1/0), got {v!r}')


# a boolean flag: --flag, --flag True, --flag=False (the official VIAR scripts parsed --x False as True)
BOOL = {'type': str2bool, 'nargs': '?', 'const': True, 'metavar': 'BOOL'}


class Parser(argparse.ArgumentParser):
    """Under ``torchrun`` rank 0 alone reports a bad command line; the other ranks exit with status 2 quietly.
    ``error_class``: a bad command line raises it with argparse's message instead (a script that prints every error
    as one line)."""

    def __init__(self, *args, error_class: Optional[type] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_class = error_class

    def error(self, message):
        if self.error_class is not None:
            raise self.error_class(message)
        if os.environ.get('RANK', '0') != '0':
            sys.exit(2)
        super().error(message)


def parse_scales(text, presets: Optional[Mapping[str, Tuple[int, ...]]] = None,
                 from_one: bool = False) -> Tuple[int, ...]:
    """Token-map sides: a preset name of ``presets`` or sides like ``1_2_3_4`` (``-`` also separates; a tuple or list
    is checked as it is) -> a strictly increasing tuple of positive sides (``from_one``: starting at 1).  Raises
    ``ValueError`` saying what is wrong."""
    if isinstance(text, (tuple, list)):
        pns = tuple(text)
    else:
        s = str(text).strip()
        if presets and s in presets:
            return tuple(presets[s])
        try:
            pns = tuple(int(x) for x in s.replace('-', '_').split('_'))
        except ValueError as e:
            raise ValueError(f'{text!r} is not token-map sides like 1_2_3_4') from e
    if not pns or any(not isinstance(x, int) or x < 1 for x in pns) or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ValueError(f'the sides {text!r} must be positive and strictly increasing')
    if from_one and pns[0] != 1:
        raise ValueError(f'the sides {text!r} must start at 1')
    return pns


def schedule_name(pns) -> str:
    """``(1, 2, 4)`` -> ``'1_2_4'``, as folders and logs name a schedule."""
    return '_'.join(map(str, pns))


def parse_iterations(text: str, flag: str = '', error: type = ValueError) -> Tuple[int, int]:
    """VIAR's iteration schedule ``LEFT-RIGHT`` (``->``, ``→`` and ``:`` also separate): implicit iterations at the
    first and at the last scale (linear between).  Raises ``error`` (one line naming ``flag``); the caller checks its
    own lower bound."""
    m = re.fullmatch(r'\s*(\d+)\s*(?:->|→|-|:)\s*(\d+)\s*', str(text))
    if not m:
        raise error(f'could not read the iteration schedule {flag + " " if flag else ""}{text!r}: write LEFT-RIGHT '
                    f'(implicit iterations at the first and the last scale), e.g. 10-5')
    return int(m.group(1)), int(m.group(2))
