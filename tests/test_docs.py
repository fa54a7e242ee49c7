"""README.md and docs/: every relative link resolves (files and #anchors; its length: test_layers.py), the commands it
shows exist and are what CI and the scripts run, and its Python example matches the code's signatures."""
import ast
import inspect
import re

import pytest

from readme_commands import FENCE, README, code_blocks, shell_lines

REPO = README.parent
PAGES = [README, *sorted((REPO / 'docs').glob('*.md'))]
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$', re.M)


def prose(text):
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r'`[^`\n]*`', '', FENCE.sub('', text))


def anchors(path):
    """GitHub's heading ids of a Markdown file: lower case, punctuation dropped, spaces to '-', '-1' ... for repeats."""
    seen, ids = {}, set()
    for _, title in HEADING.findall(FENCE.sub('', path.read_text())):
        slug = re.sub(r'[^\w\- ]', '', title.replace('`', '').lower()).replace(' ', '-')
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f'{slug}-{n}')
    return ids


def relative_links(page):
    for target in LINK.findall(prose(page.read_text())):
        if not re.match(r'^[a-z][a-z0-9+.-]*:', target):       # http:, https:, mailto: ... are not checked here
            yield target


def test_docs_folder_has_the_manual():
    names = {p.name for p in PAGES[1:]}
    assert {'training.md', 'tokenizer.md', 'sampling_evaluation.md', 'performance.md', 'parity.md', 'demo.md'} <= names


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    bad = []
    for target in relative_links(page):
        path, _, anchor = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f'{target}: no such file')
        elif not dest.is_relative_to(REPO):
            bad.append(f'{target}: outside the repository')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            bad.append(f'{target}: no heading #{anchor} in {dest.relative_to(REPO)}')
    assert not bad, f'{page.relative_to(REPO)}: ' + '; '.join(bad)


def test_readme_commands_exist_and_ci_runs_the_test_command():
    lines = shell_lines()
    for script in ('scripts/demo.sh', 'scripts/test.sh', 'scripts/train.sh', 'scripts/eval.sh'):
        assert any(line.startswith(f'bash {script}') for line in lines), script
        assert (REPO / script).is_file(), script
    for py in ('gen_img.py', 'sampling.py', 'evaluator.py', 'train.py'):
        assert (REPO / py).is_file(), py
    assert 'bash scripts/test.sh -m "not slow"' in lines                 # the quick pass the README documents
    ci = [line.strip() for line in (REPO / '.ci' / 'run').read_text().splitlines()]
    assert 'bash scripts/test.sh' in ci and 'bash scripts/test.sh' in lines


def test_readme_python_example_matches_the_code():
    """The README's Python block compiles, its imports exist, and every call it makes to the models' API passes
    keyword arguments that the called function accepts (nothing is built or loaded)."""
    from models.var import VAR
    blocks = code_blocks(README, langs=('python',))
    assert blocks, 'README.md has no Python example'
    namespace, methods, calls = {}, {'autoregressive_infer_cfg': VAR.autoregressive_infer_cfg}, 0
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), 'README.md', 'exec'), namespace)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            target = (namespace.get(fn.id) if isinstance(fn, ast.Name) and fn.id in ('build_vae_var', 'load_vae_var')
                      else methods.get(fn.attr) if isinstance(fn, ast.Attribute) else None)
            if target is None:
                continue
            calls += 1
            params = inspect.signature(target).parameters
            extra = [kw.arg for kw in node.keywords if kw.arg not in params]
            assert not extra, f'README.md calls {target.__qualname__} with unknown arguments {extra}'
    assert calls >= 3, 'the example should show load_vae_var, autoregressive_infer_cfg and build_vae_var'
