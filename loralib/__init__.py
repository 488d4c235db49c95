"""loralib: LoRA from scratch for RoBERTa, with GLUE/SQuAD benchmarks and PEFT/QLoRA interop.

The names exported here are the public API; submodules hold one concept each:
layers (LoraLinear), injection (inject/merge/unload), adapters (save/load), utils (seeding,
versions, parameter counts), tiny (the offline tiny RoBERTa).
"""

from loralib.adapters import load_lora, lora_config, lora_state_dict, read_adapter, save_lora
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

__all__ = [
    "LoraLinear",
    "count_parameters",
    "default_model_id",
    "output_dir",
    "find_targets",
    "inject_lora",
    "load_lora",
    "lora_config",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "print_versions",
    "read_adapter",
    "save_lora",
    "set_seed",
    "unload_lora",
    "unmerge_lora",
    "versions",
]
