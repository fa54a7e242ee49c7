"""The layering and hygiene rules a newcomer relies on, checked on the source files themselves (AST and text):
``models/`` imports nothing from ``utils/`` or the scripts, each published file name is written in at most two
Python files, module docstrings stay short, ``raise ... from None`` is rare, nothing points at a document outside
the repository, and the README stays short (its links are checked by test_docs.py)."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {'train', 'train_vae', 'sampling', 'gen_img', 'evaluator', 'demo', 'app', 'hubconf', 'scripts', 'tests'}
MAX_DOCSTRING_LINES = 15
MAX_FROM_NONE = 5


def tracked(*patterns):
    """The repository's files (git ls-files) matching ``patterns``; a copy without git: every file under REPO."""
    try:
        out = subprocess.run(['git', 'ls-files', *patterns], cwd=REPO, capture_output=True, text=True, check=True)
        return [REPO / p for p in out.stdout.split() if (REPO / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for pat in patterns for p in REPO.glob(f'**/{pat}') if '.git' not in p.parts]


def python_files(include_tests=True):
    return [p for p in tracked('*.py') if include_tests or p.relative_to(REPO).parts[0] != 'tests']


def imported_modules(tree):
    """Every module an AST imports, at the top or inside functions (absolute names; relative imports as '.x')."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = '.' * node.level + (node.module or '')
            yield base
            yield from (f'{base}.{a.name}' for a in node.names)     # from utils import training: utils.training


def test_models_import_nothing_from_utils_or_the_scripts():
    bad = []
    for path in sorted((REPO / 'models').rglob('*.py')):
        for mod in imported_modules(ast.parse(path.read_text())):
            if mod.split('.')[0] in SCRIPTS | {'utils'}:
                bad.append(f'{path.relative_to(REPO)} imports {".".join(mod.split(".")[:2])}')
    assert not bad, '; '.join(dict.fromkeys(bad))


APPLICATION = {'training', 'train_state', 'model_io', 'sampling_utils', 'sampler_settings', 'folder_sampling'}


def test_the_ground_floor_of_utils_imports_no_model():
    """utils/ outside the application layer (README, "Layout") imports neither models/ nor the application layer."""
    bad = []
    for path in sorted((REPO / 'utils').glob('*.py')):
        if path.stem in APPLICATION:
            continue
        for mod in imported_modules(ast.parse(path.read_text())):
            parts = mod.split('.')
            if parts[0] in SCRIPTS | {'models'} or (parts[0] == 'utils' and len(parts) > 1 and parts[1] in APPLICATION):
                bad.append(f'{path.relative_to(REPO)} imports {".".join(parts[:2])}')
    assert not bad, '; '.join(dict.fromkeys(bad))


def test_the_layer_check_sees_lazy_imports():
    """The check above also finds an import inside a function (the usual way a layer leaks)."""
    tree = ast.parse('def f():\n    from utils import errors\n    import train\n')
    assert list(imported_modules(tree)) == ['utils', 'utils.errors', 'train']


ENTRY_SCRIPTS = ['train.py', 'train_vae.py', 'sampling.py', 'gen_img.py', 'evaluator.py', 'demo.py', 'app.py',
                 *sorted(f'scripts/{p.name}' for p in (REPO / 'scripts').glob('*.py') if not p.stem.startswith('_'))]


@pytest.mark.parametrize('script', ENTRY_SCRIPTS)
def test_every_script_has_the_one_entry_point(script):
    """``def main(argv=None) -> int`` and ``if __name__ == '__main__': raise SystemExit(main())``."""
    tree = ast.parse((REPO / script).read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'main']
    assert len(mains) == 1 and [a.arg for a in mains[0].args.args] == ['argv'], script
    assert isinstance(mains[0].args.defaults[0], ast.Constant) and mains[0].args.defaults[0].value is None, script
    guard = [n for n in tree.body if isinstance(n, ast.If) and '__main__' in ast.unparse(n.test)]
    assert len(guard) == 1 and ast.unparse(guard[0].body[-1]) == 'raise SystemExit(main())', script


def published_files():
    """The file names of the published checkpoints, from the one registry (``utils.zoo``)."""
    from utils import zoo
    return sorted(zoo.MODELS)


def test_each_published_file_name_is_written_in_at_most_two_python_files():
    from utils import zoo  # the registry knows the tokenizers and VIAR (their names are written only there)
    names = published_files()
    assert {zoo.VIAR_MODEL, zoo.VAR_TOKENIZER, zoo.FLEX_TOKENIZER} <= set(names) and len(names) >= 10
    sources = {p: p.read_text() for p in python_files(include_tests=False)}
    over = {}
    for name in names:
        where = [str(p.relative_to(REPO)) for p, text in sources.items() if name in text]
        if len(where) > 2:
            over[name] = where
    assert not over, f'published file names written in more than two Python files: {over}'


def module_docstring_lines(path):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    return len(doc.splitlines()) if doc else 0


def test_module_docstrings_are_short():
    long = {str(p.relative_to(REPO)): n for p in python_files()
            if (n := module_docstring_lines(p)) > MAX_DOCSTRING_LINES}
    assert not long, f'module docstrings over {MAX_DOCSTRING_LINES} lines (move the details to docs/): {long}'


def from_none(path):
    """Line numbers of ``raise ... from None`` in a file."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Raise) and isinstance(n.cause, ast.Constant) and n.cause.value is None]


def test_raise_from_none_is_rare_and_argued():
    """``from e`` keeps the cause for ``VIAR_TRACEBACK=1``; each remaining ``from None`` has a comment saying why."""
    found = {p: lines for p in python_files() if (lines := from_none(p))}
    total = sum(len(v) for v in found.values())
    assert total <= MAX_FROM_NONE, {str(p.relative_to(REPO)): v for p, v in found.items()}
    for path, lines in found.items():
        text = path.read_text().splitlines()
        for n in lines:
            near = ' '.join(text[max(0, n - 3):n + 1])
            assert '#' in near, f'{path.relative_to(REPO)}:{n}: raise ... from None without a comment saying why'


# A document outside the repository (a spec, a shared folder of notes) means nothing to a reader of the repository.
# ../shared/golden is not a document: it is where the tests look for an optional larger set of parity vectors
# (tests/conftest.py, docs/parity.md), and nothing else may point into ../shared.
OUTSIDE = re.compile(r'\bSPEC\b|SPEC\.md|\.\./shared(?!/golden)')


def test_no_reference_to_a_document_outside_the_repository():
    bad = []
    for path in tracked('*.py', '*.md', '*.sh', '*.txt', '*.toml', '*.json'):
        if path == Path(__file__).resolve():        # this file names the patterns it looks for
            continue
        for i, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f'{path.relative_to(REPO)}:{i}: {line.strip()[:80]}')
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('text, hit', [('see SPEC §6', True), ('SPEC.md', True), ('../shared/notes.md', True),
                                       ('../shared/golden', False), ('ASPECT_TOLERANCE', False)])
def test_the_outside_reference_check_itself(text, hit):
    assert bool(OUTSIDE.search(text)) is hit


def test_docs_pages_named_in_the_code_exist():
    """Module docstrings send readers to docs/ pages: those pages exist."""
    missing = set()
    for path in python_files():
        for page in re.findall(r'docs/([\w-]+\.md)', path.read_text()):
            if not (REPO / 'docs' / page).is_file():
                missing.add(f'{path.relative_to(REPO)}: docs/{page}')
    assert not missing, sorted(missing)


def test_readme_is_short_and_describes_the_layers():
    text = (REPO / 'README.md').read_text()
    n = len(text.splitlines())
    assert n <= 250, f'README.md has {n} lines; move details into docs/'
    layout = text.split('## Layout', 1)[1].split('\n## ', 1)[0]
    for row in ('`models/`', '`utils/`', '`scripts/`', '`tests/`', '`docs/`', '`train.py`'):
        assert f'| {row}' in layout, f'the README layout table has no row for {row}'
