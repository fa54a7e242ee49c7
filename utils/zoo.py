"""The published models: one ``Published`` entry per file (Hugging Face repository, the tokenizer it needs, family,
depth, resolution, evaluation settings, training recipe).  Downloads (``utils.download``), default paths, help texts,
``scripts/eval.sh`` and the table of ``ckpts/README.md`` read it: adding a checkpoint is one entry of ``MODELS``.
Ground floor: imports no model.

    python -m utils.zoo table                          # the table of ckpts/README.md
    python -m utils.zoo eval-args [--flexvar d24 [--infer_pn 512] [--cfg 3]]    # what scripts/eval.sh runs
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from utils.flags import FLEX_SCHEDULE_PRESETS, parse_scales, schedule_name

__all__ = ['CKPT_DIR', 'FAMILIES', 'FLEX_TOKENIZER', 'MODELS', 'VAR_TOKENIZER', 'VIAR_MODEL', 'Evaluation',
           'Published', 'default_path', 'eval_argv', 'flex_models', 'hf_url', 'markdown_table', 'var_file']

CKPT_DIR = 'ckpts'
FAMILIES = ('VAR', 'VIAR', 'FlexVAR', 'implicit FlexVAR')


@dataclass(frozen=True)
class Evaluation:
    """The settings of the documented FID evaluation (``sampling.py`` flags; None: the script's default)."""
    cfg: float
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_pn: Optional[int] = None                    # FlexVAR
    infer_pn: Optional[str] = None                  # FlexVAR: the default schedule (a preset or sides)
    cfg_512: Optional[float] = None                 # FlexVAR: the cfg of a 512 px schedule
    iters: Optional[Tuple[int, int]] = None         # VIAR: (--iter_left, --iter_right)


@dataclass(frozen=True)
class Published:
    """One published file.  ``tokenizer``: the file a transformer needs (None: it is a tokenizer)."""
    file: str
    repo: str
    family: str                                     # one of FAMILIES (a tokenizer: the family it serves)
    what: str                                       # the 'what' column of ckpts/README.md
    tokenizer: Optional[str] = None
    depth: Optional[int] = None
    reso: Optional[int] = None
    evaluation: Optional[Evaluation] = None
    recipe: Tuple[str, ...] = field(default=())     # train.py flags of the documented training run

    @property
    def url(self) -> str:
        return hf_url(self.file, self.repo)


_VAR, _VIAR, _FLEX = 'FoundationVision/var', 'mobiushy/VIAR', 'jiaosiyu1999/FlexVAR'
_VQVAE, _FLEXVAE = 'vae_ch160v4096z32.pth', 'FlexVAE.pth'
_FLEX_EVAL = Evaluation(cfg=2.5, cfg_512=3.0, top_k=900, top_p=0.95, max_pn=16, infer_pn='256')
_ENTRIES = (
    Published(_VQVAE, _VAR, 'VAR', 'multi-scale VQVAE tokenizer (V=4096, Cvae=32, ch=160), used by every VAR and VIAR '
              'model below'),
    Published('viar.pth', _VIAR, 'VIAR', 'VIAR-d30, 256 px: 5 pre + 1 implicit + 5 post blocks (770,884,426 '
              'parameters)', _VQVAE, 30, 256, Evaluation(cfg=1.5, iters=(10, 10)),
              ('--depth=30', '--bs=512', '--ep=550', '--tblr=8e-5', '--fp16=1', '--alng=1e-5', '--wpe=0.01',
               '--twde=0.08', '--use_implicit=True', '--p_depth=5')),
    Published('var_d16.pth', _VAR, 'VAR', 'VAR-d16, 256 px (310M parameters)', _VQVAE, 16, 256),
    Published('var_d20.pth', _VAR, 'VAR', 'VAR-d20, 256 px (600M)', _VQVAE, 20, 256),
    Published('var_d24.pth', _VAR, 'VAR', 'VAR-d24, 256 px (1.0B)', _VQVAE, 24, 256),
    Published('var_d30.pth', _VAR, 'VAR', 'VAR-d30, 256 px (2,010,020,356 parameters)', _VQVAE, 30, 256,
              Evaluation(cfg=1.5)),
    Published('var_d36.pth', _VAR, 'VAR', 'VAR-d36, 512 px, shared AdaLN', _VQVAE, 36, 512),
    Published(_FLEXVAE, _FLEX, 'FlexVAR', "FlexVAR's tokenizer: LlamaGen's VQ-16 with an l2-normalised codebook "
              "(V=8912, Cvae=32; 72M parameters), used by the FlexVAR models below; stored as `{'model': "
              "state_dict}`"),
    Published('FlexVARd16-epo179.pth', _FLEX, 'FlexVAR', 'FlexVAR-d16, 256 px, trained on random schedules within '
              '1_2_3_4_5_6_8_10_13_16; samples any schedule (316M parameters)', _FLEXVAE, 16, 256, _FLEX_EVAL),
    Published('FlexVARd20-epo249.pth', _FLEX, 'FlexVAR', 'FlexVAR-d20, as above (608M)', _FLEXVAE, 20, 256,
              _FLEX_EVAL),
    Published('FlexVARd24-epo349.pth', _FLEX, 'FlexVAR', 'FlexVAR-d24, as above (1.04B)', _FLEXVAE, 24, 256,
              _FLEX_EVAL, ('--flex', '--depth=24', '--bs=768', '--ep=350', '--tblr=8e-5', '--fp16=1', '--alng=1e-4',
                           '--wpe=0.01')),
)
MODELS: Dict[str, Published] = {e.file: e for e in _ENTRIES}
VAR_TOKENIZER, FLEX_TOKENIZER = _VQVAE, _FLEXVAE        # the tokenizer of each family's transformers
VIAR_MODEL = 'viar.pth'                                 # the scripts' default model (gen_img.py --use_implicit)


def hf_url(filename: str, repo_id: Optional[str] = None) -> str:
    return f'https://huggingface.co/{repo_id or MODELS[filename].repo}/resolve/main/{filename}'


def default_path(filename: str, ckpt_dir: str = CKPT_DIR) -> str:
    """Where the scripts look for a published file: ``ckpts/<file>``."""
    return os.path.join(ckpt_dir, filename)


def var_file(depth: int) -> str:
    """VAR's published file name pattern for a depth (the file exists for the depths of ``MODELS``)."""
    return f'var_d{depth}.pth'


def flex_models() -> Dict[int, Published]:
    """depth -> the published FlexVAR transformer of that depth."""
    return {e.depth: e for e in _ENTRIES if e.family == 'FlexVAR' and e.tokenizer}


def eval_argv(name: str, infer_pn: Optional[str] = None, cfg: Optional[str] = None) -> Tuple[int, str, list]:
    """(resolution, the .npz sampling.py packs, sampling.py's arguments) of the documented evaluation of ``name``;
    FlexVAR: any schedule ``infer_pn`` (a preset of ``FLEX_SCHEDULE_PRESETS`` or sides) and ``cfg`` (default: the
    entry's, ``cfg_512`` for a 512 px schedule).  Raises ``ValueError`` for a bad schedule or cfg."""
    e = MODELS[name]
    ev, ckpt, vae = e.evaluation, default_path(e.file), default_path(e.tokenizer)
    if e.family != 'FlexVAR':
        argv = ['--ckpt_path', ckpt, '--vae_ckpt', vae, '--cfg', str(ev.cfg), '--depth', str(e.depth),
                '--sample_dir', 'samples']
        if ev.iters:
            argv += ['--use_implicit', 'True', '--iter_left', str(ev.iters[0]), '--iter_right', str(ev.iters[1])]
        folder = f'implicit-{e.file}' if ev.iters else f'd{e.depth}-{e.file}'
        return e.reso, f'samples/{folder}-cfg-{ev.cfg}-seed-1.npz', argv
    text = infer_pn or ev.infer_pn
    try:
        pns = parse_scales(text, FLEX_SCHEDULE_PRESETS)
    except ValueError as e:
        raise ValueError(f'INFER_PN must be token-map sides like 1_2_3_4_5_6_8_10_13_16, or '
                         f'{" / ".join(FLEX_SCHEDULE_PRESETS)}, got {text!r}') from e
    reso = 16 * pns[-1]
    if cfg is None:
        cfg_value = ev.cfg_512 if reso == 512 else ev.cfg
    else:
        import re
        if not re.fullmatch(r'[0-9]+(\.[0-9]*)?', cfg):
            raise ValueError(f'CFG must be a number like {ev.cfg}, got {cfg!r}')
        cfg_value = float(cfg)
    pn = schedule_name(pns)
    argv = ['--ckpt_path', ckpt, '--vae_ckpt', vae, '--depth', str(e.depth), '--infer_pn', pn, '--cfg', str(cfg_value),
            '--top_k', str(ev.top_k), '--top_p', str(ev.top_p), '--max_pn', str(ev.max_pn), '--sample_dir', 'samples']
    npz = f'samples/flexvar-d{e.depth}-{e.file}-pn{pn}-cfg-{cfg_value}-maxpn-{ev.max_pn}-seed-1.npz'
    return reso, npz, argv


def markdown_table() -> str:
    """The table of ``ckpts/README.md``."""
    rows = ['| file | what | Hugging Face repository | URL |', '|---|---|---|---|']
    rows += [f'| `{e.file}` | {e.what} | `{e.repo}` | {e.url} |' for e in _ENTRIES]
    return '\n'.join(rows)


def _main(argv) -> int:
    """``table`` | ``eval-args [--flexvar dN] [--infer_pn PN] [--cfg CFG]``: the latter prints the resolution, the
    .npz and then sampling.py's arguments, one a line (what scripts/eval.sh runs); a bad value: one line, status 1."""
    if argv[:1] == ['table']:
        print(markdown_table())
        return 0
    if argv[:1] != ['eval-args']:
        print('usage: python -m utils.zoo table | eval-args [--flexvar dN] [--infer_pn PN] [--cfg CFG]',
              file=sys.stderr)
        return 2
    opts = dict(zip(argv[1::2], argv[2::2]))
    flex = {f'd{d}': e.file for d, e in sorted(flex_models().items())}
    try:
        if opts.get('--flexvar'):
            if opts['--flexvar'] not in flex:
                raise ValueError(f'FLEXVAR must be {", ".join(list(flex)[:-1])} or {list(flex)[-1]} (the published '
                                 f"FlexVAR checkpoints), got '{opts['--flexvar']}'")
            reso, npz, args = eval_argv(flex[opts['--flexvar']], opts.get('--infer_pn'), opts.get('--cfg'))
        else:
            reso, npz, args = eval_argv(VIAR_MODEL)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print('\n'.join([str(reso), npz] + args))
    return 0


if __name__ == '__main__':
    sys.exit(_main(sys.argv[1:]))
