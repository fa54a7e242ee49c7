"""The folder layout of an ImageNet-style data set (``train/<class>/<images>``, ``val/<class>/<images>``), checked
without importing torch, so that ``scripts/train.sh`` can check ``--data_path`` in a fraction of a second before
torchrun starts its processes:

    python -m utils.data_layout /path/to/imagenet     # exit 0 when the layout is right, else one line and exit 1
"""
import os
import sys
from typing import List, Tuple

from utils.errors import UserError

__all__ = ['DataError', 'PLACEHOLDERS', 'class_dirs', 'check_data_path']

PLACEHOLDERS = ('/path/to/imagenet', '/path/to/imagenet-1k')     # the defaults of train.py and scripts/train.sh


class DataError(UserError):
    """The data folder is missing, malformed or holds an unreadable image; the message says what to do."""


def class_dirs(folder: str) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def check_data_path(data_path: str) -> Tuple[List[str], List[str]]:
    """(train classes, val classes) of ``data_path``; raises DataError saying what is missing."""
    layout = (f'expected {os.path.join(data_path, "train")}/<class>/<images> and '
              f'{os.path.join(data_path, "val")}/<class>/<images>')
    if data_path in PLACEHOLDERS:
        raise DataError(f'--data_path is still the placeholder {data_path!r}: pass --data_path=/your/imagenet '
                        f'(the folder holding train/ and val/), or edit it in scripts/train.sh')
    if not os.path.exists(data_path):
        raise DataError(f'--data_path {data_path!r} does not exist ({layout})')
    if not os.path.isdir(data_path):
        raise DataError(f'--data_path {data_path!r} is a file, not a folder ({layout})')
    missing = [s for s in ('train', 'val') if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        folders = ' and no '.join(m + '/' for m in missing)
        raise DataError(f'--data_path {data_path!r} has no {folders} folder ({layout})')
    train_cls, val_cls = class_dirs(os.path.join(data_path, 'train')), class_dirs(os.path.join(data_path, 'val'))
    for split, cls in (('train', train_cls), ('val', val_cls)):
        if not cls:
            raise DataError(f'{os.path.join(data_path, split)!r} holds no class folders ({layout}); '
                            f'for ImageNet val, sort the images into one folder per class')
    extra = sorted(set(val_cls) - set(train_cls))
    if extra:
        raise DataError(f'{os.path.join(data_path, "val")!r} has class folders that train/ lacks: {extra[:5]}'
                        f'{" ..." if len(extra) > 5 else ""}; train/ and val/ must use the same class folder names')
    return train_cls, val_cls


if __name__ == '__main__':
    if len(sys.argv) not in (2, 3):
        sys.exit('usage: python -m utils.data_layout DATA_PATH [NAME_IN_MESSAGES]')
    try:
        check_data_path(sys.argv[1])
    except DataError as e:
        print(f'{sys.argv[2] if len(sys.argv) > 2 else "data_layout"}: error: {e}', file=sys.stderr)
        sys.exit(1)
