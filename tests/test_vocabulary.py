"""One vocabulary: the registry of published models (utils/zoo.py) drives downloads, defaults, help texts,
scripts/eval.sh and the table of ckpts/README.md; one parser per meaning of a schedule (utils/flags.py).  No model is
built here: fast."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from utils import download, flags, zoo
from utils.arg_util import FLEX_VAE, VAR_VAE, parse_patch_nums

REPO = Path(__file__).resolve().parent.parent


# ================================ the registry ========================================================================
def test_ckpts_readme_table_is_the_registry():
    text = (REPO / 'ckpts' / 'README.md').read_text()
    table = zoo.markdown_table()
    assert table in text
    rows = [line for line in text.splitlines() if line.startswith('| `')]
    assert rows == table.splitlines()[2:]           # no row of the README outside the registry
    assert len(rows) == len(zoo.MODELS)


def test_registry_entries_are_consistent():
    for name, e in zoo.MODELS.items():
        assert e.file == name and e.family in zoo.FAMILIES and e.what
        assert e.url == f'https://huggingface.co/{e.repo}/resolve/main/{name}'
        if e.tokenizer is None:         # a tokenizer
            assert e.depth is None and e.evaluation is None
        else:
            assert zoo.MODELS[e.tokenizer].tokenizer is None and e.depth >= 1 and e.reso in (256, 512)
            assert e.tokenizer == (zoo.FLEX_TOKENIZER if e.family == 'FlexVAR' else zoo.VAR_TOKENIZER)
    assert zoo.MODELS[zoo.VIAR_MODEL].family == 'VIAR'
    for depth in (16, 20, 24, 30, 36):
        assert zoo.MODELS[zoo.var_file(depth)].depth == depth
    assert sorted(zoo.flex_models()) == [16, 20, 24]


def test_downloads_and_defaults_read_the_registry(tmp_path, monkeypatch):
    from utils import sampling_utils
    assert download.PUBLISHED == {name: e.repo for name, e in zoo.MODELS.items()}
    assert (VAR_VAE, FLEX_VAE) == (zoo.default_path(zoo.VAR_TOKENIZER), zoo.default_path(zoo.FLEX_TOKENIZER))
    ns = argparse.Namespace(use_implicit=True, depth=None)
    assert sampling_utils.default_var_ckpt(ns, 30) == zoo.default_path(zoo.VIAR_MODEL)
    ns.use_implicit, ns.depth = False, 20
    assert sampling_utils.default_var_ckpt(ns, 30) == zoo.default_path(zoo.var_file(20))
    monkeypatch.chdir(tmp_path)        # not downloaded: the tokenizer of a published file is the registry's
    for e in zoo.flex_models().values():
        assert sampling_utils.default_vae_ckpt(zoo.default_path(e.file)) == zoo.default_path(zoo.FLEX_TOKENIZER)
    assert sampling_utils.default_vae_ckpt(zoo.default_path(zoo.VIAR_MODEL)) == zoo.default_path(zoo.VAR_TOKENIZER)
    import train
    assert zoo.hf_url(zoo.FLEX_TOKENIZER) in train.vae_hint(True)
    assert zoo.hf_url(zoo.VAR_TOKENIZER) in train.vae_hint(False)


def test_eval_args_are_the_registry_settings():
    reso, npz, argv = zoo.eval_argv(zoo.VIAR_MODEL)
    ev = zoo.MODELS[zoo.VIAR_MODEL].evaluation
    assert reso == 256 and npz == f'samples/implicit-{zoo.VIAR_MODEL}-cfg-{ev.cfg}-seed-1.npz'
    assert argv[argv.index('--iter_left') + 1] == str(ev.iters[0])
    e = zoo.flex_models()[20]
    reso, npz, argv = zoo.eval_argv(e.file, '512')
    assert reso == 512 and argv[argv.index('--cfg') + 1] == str(e.evaluation.cfg_512)
    assert argv[argv.index('--infer_pn') + 1] == flags.schedule_name(flags.FLEX_SCHEDULE_PRESETS['512'])
    with pytest.raises(ValueError, match='INFER_PN must be'):
        zoo.eval_argv(e.file, '2_1')
    with pytest.raises(ValueError, match='CFG must be a number'):
        zoo.eval_argv(e.file, None, '-1')
    r = subprocess.run([sys.executable, '-m', 'utils.zoo', 'eval-args', '--flexvar', 'd24', '--infer_pn', '1-2-04-8',
                        '--cfg', '2.50'], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == [
        '128', f'samples/flexvar-d24-{zoo.flex_models()[24].file}-pn1_2_4_8-cfg-2.5-maxpn-16-seed-1.npz']
    r = subprocess.run([sys.executable, '-m', 'utils.zoo', 'eval-args', '--flexvar', 'd30'], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == ("error: FLEXVAR must be d16, d20 or d24 (the published FlexVAR "
                                              "checkpoints), got 'd30'\n")


def test_ground_floor_imports_no_model():
    code = ('import sys, utils.zoo, utils.flags, utils.arg_util; '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("models", "torch")))')
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr


# ================================ the parsers =========================================================================
def test_scales_parser_spellings():
    var, flex = flags.VAR_SCALE_PRESETS, flags.FLEX_SCHEDULE_PRESETS
    assert var['256'] == flex['256'] and var['512'] != flex['512']        # '512' means two things: two names
    assert flags.parse_scales('512', var) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert flags.parse_scales(' 512 ', flex)[-3:] == (16, 23, 32)
    assert flags.parse_scales('1_2_3_4') == flags.parse_scales('1-2-3-4') == flags.parse_scales('1-2_03_4') == (
        1, 2, 3, 4)
    assert flags.parse_scales([1, 2, 4]) == (1, 2, 4)
    assert flags.parse_scales('2_4') == (2, 4)
    for bad in ('', '1,2', '1_1', '2_1', '0_1', 'x', '256_'):
        with pytest.raises(ValueError):
            flags.parse_scales(bad, var)
    with pytest.raises(ValueError, match='start at 1'):
        flags.parse_scales('2_4', from_one=True)
    assert parse_patch_nums('256') == list(var['256']) and parse_patch_nums('1-2-3') == [1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError, match='--pn must be'):
        parse_patch_nums('3_2')


def test_infer_pn_and_pn_presets_keep_their_meanings():
    from utils.arg_util import parse_args
    from utils.sampler_settings import SamplerSettings
    assert parse_args(['--pn', '512']).patch_nums == list(flags.VAR_SCALE_PRESETS['512'])
    kw = SamplerSettings(infer_patch_nums='512').kwargs()
    assert kw['infer_patch_nums'] == flags.FLEX_SCHEDULE_PRESETS['512']
    assert SamplerSettings(infer_patch_nums='1-2-4').kwargs()['infer_patch_nums'] == (1, 2, 4)
    assert SamplerSettings(infer_patch_nums='2_4').problems()       # a schedule starts at 1


def test_iterations_parser_spellings():
    for text in ('10-5', '10->5', '10→5', '10:5', ' 10 - 5 '):
        assert flags.parse_iterations(text) == (10, 5)
    for bad in ('10to5', '10', '-1-5', '10-5-3', ''):
        with pytest.raises(ValueError, match='could not read the iteration schedule .*LEFT-RIGHT'):
            flags.parse_iterations(bad)


def test_bool_flags_and_quiet_parser(monkeypatch, capsys):
    p = flags.Parser(prog='x')
    p.add_argument('--on', default=False, **flags.BOOL)
    assert p.parse_args(['--on']).on is True and p.parse_args(['--on', 'False']).on is False
    assert p.parse_args(['--on=yes']).on is True and p.parse_args([]).on is False
    monkeypatch.setenv('RANK', '1')
    with pytest.raises(SystemExit) as e:
        p.parse_args(['--on', 'maybe'])
    assert e.value.code == 2 and capsys.readouterr().err == ''


def test_each_published_file_name_is_written_in_the_registry_only():
    """Tests included, a published file name appears in utils/zoo.py and in at most one more Python file (the
    golden-vector generator names the FlexVAR tokenizer in the vectors' key layout)."""
    files = subprocess.run(['git', 'ls-files', '*.py'], cwd=REPO, capture_output=True, text=True).stdout.split()
    texts = {f: (REPO / f).read_text() for f in files if (REPO / f).exists()}
    for name in zoo.MODELS:
        where = sorted(f for f, t in texts.items() if name in t)
        assert 'utils/zoo.py' in where
        assert len(where) <= 2, (name, where)


def test_documented_training_recipes_are_the_registry_s():
    """scripts/train.sh runs the VIAR recipe of the registry; docs/training.md shows FlexVAR-d24's."""
    lines = (REPO / 'scripts' / 'train.sh').read_text().split('  train.py \\\n', 1)[1].splitlines()
    flags_sh = [line.strip().rstrip('\\').strip() for line in lines if line.strip().startswith('--')]
    flags_sh = [f for f in flags_sh if not f.startswith('--data_path')]
    assert tuple(flags_sh) == zoo.MODELS[zoo.VIAR_MODEL].recipe
    doc = ' '.join((REPO / 'docs' / 'training.md').read_text().replace('\\\n', ' ').split())
    flex = zoo.flex_models()[24].recipe
    assert f'train.py {flex[0]} --data_path=/path/to/imagenet-1k {" ".join(flex[1:])}' in doc
