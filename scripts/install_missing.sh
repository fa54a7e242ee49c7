#!/usr/bin/env bash
# Installs those of the named packages whose module cannot be imported, at the versions pinned in
# requirements-lock.txt; what is already installed is left alone.
#   bash scripts/install_missing.sh torch numpy pillow ...      # names as in requirements-lock.txt
# An installed torch / torchvision is never replaced: pip gets it as a constraint, and a missing torchvision next
# to an installed torch of another version than the lock's is installed in the release that matches that torch.
# Environment: PYTHON (interpreter, default python3), LOG_PREFIX (tag of the messages), INSTALL_DRY_RUN=1 (print
# the pip command instead of running it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TAG=${LOG_PREFIX:-[install_missing.sh]}

# one line per package to install: a requirement ("name==version" or "name"); then, after "--", constraints
plan=$("$PY" - requirements-lock.txt "$@" <<'PY'
import importlib.metadata as md
import importlib.util
import re
import sys

MODULE = {'pillow': 'PIL', 'tensorflow-cpu': 'tensorflow', 'huggingface-hub': 'huggingface_hub'}   # others: same name


def norm(name):
    return re.sub(r'[-_.]+', '-', name).lower()


lock = {}
for line in open(sys.argv[1]):
    line = line.split('#')[0].strip()
    if '==' in line:
        name, version = line.split('==', 1)
        lock[norm(name)] = version.strip()


def installed(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


want, keep = [], []
for name in map(norm, sys.argv[2:]):
    if name not in lock:
        sys.exit(f'error: {name} is not pinned in requirements-lock.txt')
    if importlib.util.find_spec(MODULE.get(name, name.replace('-', '_'))) is not None:
        continue
    torch_now = installed('torch')
    if name == 'torchvision' and torch_now and torch_now.split('+')[0] != lock['torch']:
        want.append('torchvision')            # the release that matches the installed torch (constraint below)
    else:
        want.append(f'{name}=={lock[name]}')
for dist in ('torch', 'torchvision'):         # installed ones stay as they are
    version = installed(dist)
    if version:
        keep.append(f'{dist}=={version}')
print('\n'.join(want + ['--'] + keep))
PY
)

want=() keep=() seen_sep=0
while IFS= read -r line; do
  if [ "$line" = "--" ]; then seen_sep=1
  elif [ -n "$line" ]; then
    if [ $seen_sep = 0 ]; then want+=("$line"); else keep+=("$line"); fi
  fi
done <<< "$plan"

[ ${#want[@]} -eq 0 ] && exit 0
echo "$TAG installing what is missing: ${want[*]}"
if [ "${INSTALL_DRY_RUN:-0}" = 1 ]; then
  echo "$TAG would run: $PY -m pip install -q -c <(${keep[*]:-nothing}) ${want[*]}"
  exit 0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
[ ${#keep[@]} -gt 0 ] && printf '%s\n' "${keep[@]}" > "$constraints"
"$PY" -m pip install -q -c "$constraints" "${want[@]}" || {
  echo "$TAG error: 'pip install ${want[*]}' failed; install these packages yourself (see requirements.txt), then rerun" >&2
  exit 1
}
