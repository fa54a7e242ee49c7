"""The in-repository parity vectors against their generator (tests/golden/make.py): the same files, format version
and top-level keys, the documented official commits, weights that redraw to the stored hashes, and the size cap."""
import json

import pytest
import torch

from tests.golden import make, vectors
from tests.golden.weights import draw_params, params_sha256

COMMITS = {'FoundationVision/VAR': '78b95394fc5896192e3a003e4b295f8ea743c48f',
           'mobiushy/VIAR': 'e7efe430ea63e1764bf13c9758b8f883ab4136be',
           'jiaosiyu1999/FlexVAR': '04462cb6e1bbb4524bfcafcd5c5701894a3ac7d1'}


def _origins(d):
    """Every {'repo', 'commit'} record of a file's ``official`` entry."""
    o = d['official']
    return [o] if 'repo' in o else list(o.values())


def test_golden_files_are_the_generators_layout():
    present = sorted(str(p.relative_to(make.DATA)) for p in make.DATA.rglob('*') if p.is_file())
    assert present == sorted(make.LAYOUT), 'tests/golden/data and tests.golden.make.LAYOUT list other files'
    for rel, keys in make.LAYOUT.items():
        if keys is None:
            continue
        d = json.loads((make.DATA / rel).read_text()) if rel.endswith('.json') else vectors.load(make.DATA, rel)
        assert d['format'] == make.FORMAT, f'{rel}: format {d["format"]}, the generator writes {make.FORMAT}'
        assert set(d) == keys, f'{rel}: keys {sorted(d)} are not the generator\'s {sorted(keys)}'
        for origin in _origins(d):
            repo = origin['repo'].split(' ')[0]
            assert origin['commit'] == COMMITS[repo], (rel, origin)


def test_golden_vectors_fit_the_size_cap():
    total = sum(p.stat().st_size for p in make.DATA.rglob('*') if p.is_file())
    assert total <= 10 * 2 ** 20, f'{total} bytes of vectors (the cap is 10 MB)'


@pytest.mark.parametrize('rel, which', [('models/vqvae.pt', None), ('models/var.pt', 'var'),
                                        ('models/var.pt', 'vqvae'), ('models/var_saln.pt', 'var'),
                                        ('models/viar.pt', 'var'), ('models/viar.pt', 'vqvae'),
                                        ('flexvar/flexvar.pt', 'vqvae'), ('flexvar/flexvar.pt', 'var')])
def test_golden_weights_redraw_to_the_stored_hash(rel, which):
    rec = vectors.load(make.DATA, rel)['weights']
    rec = rec if which is None else rec[which]
    params = draw_params(rec['shapes'], rec['seed'])
    assert params_sha256(params) == rec['sha256']
    assert all(torch.equal(t, t.bfloat16().float()) for t in params.values())       # bf16-exact
    # one changed value, name or seed changes the hash
    name = next(iter(params))
    bumped = dict(params)
    bumped[name] = params[name].clone().flatten().index_add_(0, torch.tensor([0]), torch.tensor([2.0 ** -6]))
    assert params_sha256({**params, name: bumped[name].view_as(params[name])}) != rec['sha256']
    assert params_sha256(draw_params(rec['shapes'], rec['seed'] + 1)) != rec['sha256']


def test_golden_tokenizer_shares_its_weights_across_cases():
    """Every VAR / VIAR case runs on the tokenizer of models/vqvae.pt."""
    ref = vectors.load(make.DATA, 'models/vqvae.pt')['weights']['sha256']
    for name in ('var', 'var_saln', 'viar'):
        assert vectors.load(make.DATA, f'models/{name}.pt')['weights']['vqvae']['sha256'] == ref


def test_golden_generator_needs_the_three_checkouts(capsys):
    with pytest.raises(SystemExit) as e:
        make.main(['--official_var', '/nonexistent'])
    assert e.value.code == 2 and '--official_var must name a checkout' in capsys.readouterr().err
