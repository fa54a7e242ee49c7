"""Reading the parity vectors: the in-repository set (``tests/golden/data``, always there) and, where it exists, the
team's larger set (``../shared/golden`` next to the checkout, or ``VIAR_GOLDEN``), through one interface.

The in-repository files keep the seed, shapes and SHA-256 of every model's weights; ``var_state`` / ``vae_state``
redraw them (``tests.golden.weights``) and fail on a hash that differs before anything is compared.  The other set
stores the weights themselves.  Both sets have the same case layout (``tests.golden.make`` writes it).
"""
import functools
import gzip
import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from tests.golden.make import DATA, FORMAT, bf16_kernels
from tests.golden.weights import draw_params, params_sha256

SHARED = Path(os.environ.get('VIAR_GOLDEN', Path(__file__).resolve().parents[3] / 'shared' / 'golden'))


def sources() -> Dict[str, Path]:
    """{'repo': tests/golden/data} plus {'shared': ...} where that folder exists."""
    found = {'repo': DATA}
    if SHARED.is_dir() and SHARED.resolve() != DATA.resolve():
        found['shared'] = SHARED
    return found


@functools.lru_cache(maxsize=None)
def load(src: Path, rel: str):
    """A vector file: ``.pt`` (weights_only), ``.json`` or ``.json.gz`` (the other set names them without .gz)."""
    path = Path(src) / rel
    if rel.endswith('.pt'):
        d = torch.load(path, map_location='cpu', weights_only=True)
        if 'format' in d and d['format'] != FORMAT:
            raise AssertionError(f'{path} has format {d["format"]}, tests.golden.make writes {FORMAT}: regenerate it')
        return d
    if rel.endswith('.json.gz') and not path.is_file() and path.with_suffix('').is_file():
        path = path.with_suffix('')
    text = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
    return json.loads(text)


def f32(sd):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _redraw(rec: dict, what: str) -> Dict[str, torch.Tensor]:
    params = draw_params(rec['shapes'], rec['seed'])
    got = params_sha256(params)
    if got != rec['sha256']:
        raise AssertionError(f'{what}: the weights redrawn from seed {rec["seed"]} hash to {got}, the vectors were '
                             f'made with {rec["sha256"]} (tests/golden/weights.py changed, or this torch draws '
                             f'other numbers)')
    return params


@functools.lru_cache(maxsize=None)
def vae_state(src: Path) -> Dict[str, torch.Tensor]:
    d = load(src, 'models/vqvae.pt')
    return _redraw(d['weights'], 'vqvae') if 'weights' in d else f32(d['state_vae'])


@functools.lru_cache(maxsize=None)
def var_state(src: Path, name: str) -> Dict[str, torch.Tensor]:
    """``name``: var, var_saln or viar."""
    d = load(src, f'models/{name}.pt')
    return _redraw(d['weights']['var'], name) if 'weights' in d else f32(d['state_var'])


@functools.lru_cache(maxsize=None)
def flex_states(src: Path):
    """(tokenizer, transformer) states of the FlexVAR case."""
    d = load(src, 'flexvar/flexvar.pt')
    if 'weights' in d:
        return _redraw(d['weights']['vqvae'], 'FlexVAE'), _redraw(d['weights']['var'], 'FlexVAR')
    return f32(d['state_vqvae']), f32(d['state_var'])


def load_into(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Loads ``state`` strictly; buffers it lacks (masks, counters: the in-repository vectors keep only
    parameters) come from the module itself; every parameter must be in ``state``."""
    params = {k for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
    missing = sorted(params - set(state))      # by state-dict (published) names
    assert not missing, f'parameters not in the vectors: {missing[:5]}'
    module.load_state_dict({**module.state_dict(), **state}, strict=True)
    return module


def image(d: dict, key: str = 'img') -> torch.Tensor:
    """An input image in [-1, 1]: stored as uint8 (``{key}_u8``) or as floats (``key``)."""
    return d[f'{key}_u8'].float() / 127.5 - 1 if f'{key}_u8' in d else d[key].float()


def published_keys(src: Path, name: str) -> dict:
    """``official_keys`` (VAR / VIAR checkpoints) or ``flexvar_keys``: {model: layout}."""
    d = load(src, f'{name}.json.gz')
    return d['models'] if 'format' in d else d


def evaluator_expected(src: Path) -> Dict[str, float]:
    """The five numbers the ADM evaluator printed for the evaluator batches."""
    d = json.loads((Path(src) / 'evaluator' / 'expected.json').read_text())
    if 'numbers' in d:
        return d['numbers']
    return {'Inception Score': d['Inception Score (no shuffle)'], **{k: d[k] for k in ('FID', 'sFID', 'Precision',
                                                                                       'Recall')}}


def bf16_kernels_differ(d: dict) -> Optional[str]:
    """Why the bf16 tokens of ``d`` cannot be compared exactly on this CPU (None: they can).  bf16 autocast rounds
    with the CPU's kernels, and a token near a tie of the cumulative probabilities flips with them: the in-repository
    cases record the kernels they were made with (the shared set records none and is compared as it is)."""
    made, here = d.get('kernels'), bf16_kernels()
    if made is None or made == here:
        return None
    return (f'bf16 tokens depend on the CPU kernels: these were made with {made}, this machine runs {here}; '
            f'python -m tests.golden.make on this machine makes cases for it (docs/parity.md)')


def build_models(src: Path, name: str):
    """(tokenizer, model ``name`` (var, var_saln, viar), the vector file) of the parity vectors in ``src``: built
    with ``models.build_vae_var`` from the file's config, weights loaded, eval mode, no class dropout."""
    import models
    g = load(src, f'models/{name}.pt')
    c = g['config']
    vae, var = models.build_vae_var(
        V=c['V'], Cvae=c['Cvae'], ch=c['ch'], share_quant_resi=c['share_quant_resi'], patch_nums=c['patch_nums'],
        num_classes=c['num_classes'], depth=c['depth'], shared_aln=c['shared_aln'], attn_l2_norm=c['attn_l2_norm'],
        use_implicit=c['use_implicit'], pre_depth=c['pre_depth'], post_depth=c['post_depth'])
    load_into(vae, vae_state(src))
    load_into(var, var_state(src, name))
    var.cond_drop_rate = 0.0
    return vae.eval(), var.eval(), g
