#!/usr/bin/env bash
# Lint, unit tests and notebooks (nbval), all offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg PYTHONHASHSEED=0
.venv/bin/ruff check loralib tests benchmarks scripts notebooks
.venv/bin/ruff format --check loralib tests benchmarks scripts
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider "$@"
