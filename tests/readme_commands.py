"""The commands README.md shows, as the tests read them: a test that checks a script against "the README command"
takes the command from README.md itself, so that the test fails when the README and the script drift apart."""
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'

FENCE = re.compile(r'^```(\w*)\n(.*?)^```', re.S | re.M)


def code_blocks(path=README, langs=('bash', 'shell', 'sh', '')):
    """The text of every fenced code block of ``path`` whose language is one of ``langs``."""
    return [body for lang, body in FENCE.findall(Path(path).read_text()) if lang in langs]


def shell_lines(path=README):
    """Every command line of the shell code blocks: backslash continuations joined, comments and blanks dropped."""
    lines = []
    for block in code_blocks(path):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #', 1)[0].strip() if not line.lstrip().startswith('#') else ''
            if line:
                lines.append(' '.join(line.split()))
    return lines


def readme_command(prefix, path=README):
    """The one command line of the README's shell blocks that starts with ``prefix``, split like a shell would."""
    found = [line for line in shell_lines(path) if line == prefix or line.startswith(prefix + ' ')]
    assert len(found) == 1, f'{path.name} should show exactly one command starting with {prefix!r}, found {found}'
    return shlex.split(found[0])
