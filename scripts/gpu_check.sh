#!/usr/bin/env bash
# A prepared check for a CUDA machine with no internet, in under 5 minutes: the CUDA-only tests
# (pytest -m gpu: LoraLinear under bf16 / fp16 autocast, LoRA dropout, torch.compile that must really
# compile, QLoRA and LoRA merges that must keep the adapter, Trainer steps of a roberta-base-sized model in
# bf16 and fp16, the project's bf16/fp16 decision against the GPU's compute capability, and notebook 05's
# pipeline -- train, reload, re-score -- under both precisions), the speed suite on CUDA (quick: layer, training step,
# inference), where bitsandbytes is installed the full FT / LoRA / QLoRA memory table, and the measured LoRA
# step throughput with the task time estimates it gives (estimates.md, throughput.json). Everything goes
# to $OUT (default outputs/gpu_check). Needs only torch, transformers and peft; nothing is downloaded: the
# tests build the tiny RoBERTa locally, and parts that need bitsandbytes or datasets skip with a message.
#
#     bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
$PY - <<'PYEOF' | tee "$OUT/versions.txt" || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
from loralib.utils import mixed_precision, versions
for k, v in versions().items():
    print(f"{k:>13}: {v}")
print(f"{'precision':>13}: {mixed_precision('cuda')} (native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)})")
PYEOF
echo "== pytest -m gpu"
$PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="-ra" 2>&1 | tee "$OUT/pytest.log" || status=1
echo "== speed suite on CUDA (quick)"
$PY benchmarks/bench_speed.py --device cuda --quick --threads 8 --output-dir "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
echo "== memory: full FT vs LoRA vs QLoRA"
$PY - <<'PYEOF' 2>&1 | tee "$OUT/memory.txt" || status=1
import importlib.util
if importlib.util.find_spec("bitsandbytes") is None:
    print("skipped: bitsandbytes is not installed here (carry its wheel to measure QLoRA)")
else:
    from loralib.measure import qlora_memory, steps
    res = qlora_memory.compare_training_memory(steps.roberta_config(), batch_size=16, seq_len=128, device="cuda")
    print(qlora_memory.memory_table(res))
PYEOF
echo "== throughput: measured LoRA steps of a roberta-base-sized model, and the task estimates from them"
$PY - "$OUT" <<'PYEOF' 2>&1 | tee "$OUT/estimates.md" || status=1
import json, sys
import torch
import loralib
from loralib.benchmark import estimates
from loralib.measure import steps
cfg = steps.roberta_config()
rows = {}
for seq, tasks in ((128, ["glue"]), (384, ["squad"])):
    model = steps.roberta_step_builders(cfg, methods=["loralib"], device="cuda")["loralib"]()
    thr = estimates.measure_throughput(model, batch_size=16, seq_len=seq, steps=10)
    rows[seq] = {"flops_per_s": thr.flops_per_s, "source": thr.source, "precision": thr.precision}
    print(f"{thr.name} at 16 x {seq}: {thr.source}, {thr.flops_per_s / 1e12:.1f} TFLOP/s sustained")
    print(estimates.devices_table(tasks, ["t4", "a100", thr]))
    del model
    torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(), "throughput": rows}, open(sys.argv[1] + "/throughput.json", "w"), indent=1)
PYEOF
echo "results in $OUT"
exit $status
