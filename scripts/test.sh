#!/usr/bin/env bash
# Lint, unit tests and notebooks (nbval), all offline; then the numerical tests once more under other
# CPU kernels. Extra arguments go to the first pytest run (e.g. -m "not slow" to skip the slowest tests
# locally; the README's `make test` runs everything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg PYTHONHASHSEED=0
# the reference packages set-up fetched (Microsoft's loralib wheel) must be there: a missing one fails, not skips
export LORALIB_REQUIRE_REFERENCES=1
.venv/bin/ruff check loralib tests benchmarks scripts notebooks
.venv/bin/ruff format --check loralib tests benchmarks scripts
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider "$@"
# Users' CPUs round differently: AMD and Intel kernels, AVX2-only machines, no oneDNN. The tests marked
# `numerical` run again on ATen's portable kernels (ATEN_CPU_CAPABILITY=default), oneDNN and MKL held to
# AVX2, and LoraLinear's oneDNN route for thin products off, so that a tolerance that holds only on one
# instruction set fails here rather than on a user's machine.
echo "[test] numerical tests again under ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 LORALIB_NO_ONEDNN=1"
ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 LORALIB_NO_ONEDNN=1 \
  .venv/bin/python -m pytest tests -m numerical -q -p no:cacheprovider
