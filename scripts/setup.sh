#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned requirements and loralib
# installed editable. Quick (a hash check) when nothing changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
want=$(cat requirements.txt requirements-runtime.txt requirements-nodeps.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d" " -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" && -x $VENV/bin/python ]]; then
  exit 0
fi
echo "[setup] creating $VENV and installing pinned requirements (first run: ~2 minutes)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# A plain "torch" requirement pulls a multi-GB CUDA build on a machine with no torch, so install
# the pinned release first: on these CPU machines pip finds its CPU wheel on local disk. Where torch
# is already importable (Colab, a CUDA box) it is kept; requirements.txt only asks for a range.
if ! $VENV/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -r requirements.txt
$PIP install -q --no-deps -r requirements-nodeps.txt
$PIP install -q --no-deps --no-build-isolation -e .
# Microsoft's loralib 0.1.2 (MIT), the reference tests/test_03_microsoft.py compares our compat layer
# with: only downloaded into .cache/ (never installed: its import name is ours), best effort.
mkdir -p .cache/reference
$PIP download -q --no-deps --only-binary :all: "loralib==0.1.2" -d .cache/reference >/dev/null 2>&1 \
  || echo "[setup] could not download loralib==0.1.2 (Microsoft's); its comparison tests will skip"
# JupyterLab autosaves outputs into the notebooks: git stores them stripped (.gitattributes names the
# filter; without this line git would store what the working copy holds).
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config filter.strip-outputs.clean "python3 scripts/strip_outputs.py"
  git config filter.strip-outputs.smudge cat
fi
echo "$want" > $STAMP
echo "[setup] done: $($VENV/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
