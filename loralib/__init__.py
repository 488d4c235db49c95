"""loralib: LoRA from scratch for RoBERTa, with GLUE/SQuAD benchmarks and PEFT/QLoRA interop.

The names exported here are the public API. Each submodule holds one concept:

    layers        LoraLinear (the layer, merge/unmerge)
    injection     inject_lora, mark_only_lora_as_trainable, merge/unmerge/unload
    adapters      save_lora / load_lora (safetensors + JSON, atomic)
    utils         seeding, versions, parameter counts, output folders
    tiny          the offline tiny RoBERTa
    toy           the bundled toy sentiment task and a minimal teaching loop
    plots         figures for notebooks 01 and 03
    roberta       the article's hand-written LoraRobertaSelfAttention / LoraWrapperRoberta
    data, qa      GLUE / SQuAD loading (hub or local), tokenisation, sliding windows, post-processing
    metrics       GLUE and SQuAD v1/v2 metrics, offline
    training      the Trainer-based benchmark pipeline; benchmark is its CLI; references the cited numbers
    peft_interop  to_peft / from_peft (PEFT's adapter format)
    peft_backend  building and reloading PEFT / QLoRA models (bitsandbytes 4-bit)
    qlora         what 4-bit storage does to an adapter: merging, rounding
    measure/      speed and memory measurement (benchmarks/, notebooks 03 and 06)

Heavy modules (transformers, datasets, peft) are imported lazily, on first use of their names.
"""

from importlib import import_module

from loralib.adapters import (
    adapter_size_bytes,
    load_lora,
    lora_config,
    lora_state_dict,
    read_adapter,
    save_lora,
)
from loralib.injection import (
    find_targets,
    inject_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from loralib.layers import LoraLinear
from loralib.utils import count_parameters, default_model_id, output_dir, print_versions, set_seed, versions

__version__ = "0.1.0"

_LAZY = {
    "tiny_roberta": "loralib.tiny",
    "load_toy_sentiment": "loralib.toy",
    "toy_batches": "loralib.toy",
    "train_steps": "loralib.toy",
    "evaluate_accuracy": "loralib.toy",
    "LoraRobertaSelfAttention": "loralib.roberta",
    "LoraWrapperRoberta": "loralib.roberta",
    "replace_self_attention": "loralib.roberta",
    "squad_null_decision": "loralib.roberta",
    "TaskSpec": "loralib.data",
    "GLUE_TASKS": "loralib.data",
    "SQUAD_TASKS": "loralib.data",
    "ALL_TASKS": "loralib.data",
    "DataUnavailableError": "loralib.data",
    "bundled_data_dir": "loralib.data",
    "load_glue": "loralib.data",
    "load_squad": "loralib.data",
    "load_task": "loralib.data",
    "tokenize_glue": "loralib.data",
    "glue_metrics": "loralib.metrics",
    "squad_metrics": "loralib.metrics",
    "prepare_train_features": "loralib.qa",
    "prepare_eval_features": "loralib.qa",
    "postprocess_qa_predictions": "loralib.qa",
    "TrainConfig": "loralib.training",
    "run_task": "loralib.training",
    "run_benchmark": "loralib.training",
    "to_peft": "loralib.peft_interop",
    "from_peft": "loralib.peft_interop",
    "read_peft_adapter": "loralib.peft_interop",
    "build_peft_model": "loralib.peft_backend",
    "save_peft_model": "loralib.peft_backend",
    "load_peft_model": "loralib.peft_backend",
    "merge_adapter": "loralib.qlora",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loralib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LoraLinear",
    "adapter_size_bytes",
    "count_parameters",
    "default_model_id",
    "find_targets",
    "inject_lora",
    "load_lora",
    "lora_config",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "output_dir",
    "print_versions",
    "read_adapter",
    "save_lora",
    "set_seed",
    "unload_lora",
    "unmerge_lora",
    "versions",
    *_LAZY,
]
