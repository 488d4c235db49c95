"""loralib: LoRA from scratch for RoBERTa, with GLUE/SQuAD benchmarks and PEFT/QLoRA interop.

The names exported here are the core a reader of notebook 03 needs, plus Microsoft's loralib 0.1.2 API
(`Linear(768, 768, r=16)`, `MergedLinear`, `Embedding`, `Conv2d`, `mark_only_lora_as_trainable(model,
bias=...)`, `lora_state_dict(model, bias=...)`), so code written for it runs unchanged; everything else is
reached by its module. One module (or folder) per concept:

    config        LoraConfig (PEFT's fields and defaults, validated once; PEFT's JSON both ways), LoraSettings
    layers/       base (LoraLayer: what every LoRA layer shares; the registry base type -> LoRA class),
                  linear (LoraLinear), embedding (LoraEmbedding), conv (LoraConv1d/2d/3d), conv1d (GPT-2)
    compat/       microsoft: Microsoft loralib 0.1.2's Linear, Embedding, MergedLinear, Conv*, LoRALayer
    fast_path     LoraLinear's custom autograd Function, thin-product routing and LoRA dropout's CPU mask
    injection     inject_lora, mark_only_lora_as_trainable, merge/unmerge/unload, rollback on failure
    adapters      save_lora / load_lora (safetensors + JSON, one atomic directory), save_adapters / load_adapters
    named         several named adapters in one model: add/set/delete_adapter, a head per adapter,
                  mixed batches (adapter_batch), add_weighted_adapter (layers/slots: the per-layer part)
    checks        argument validation, one wording for every entry point
    utils         seeding, versions, devices and precision, parameter counts, atomic writes, output folders
    tiny          the offline tiny RoBERTa (and the default model of the notebooks)
    toy           the bundled toy sentiment task and a minimal teaching loop
    plots         figures for notebooks 01 and 03
    article/      the seed article's hand-written LoraRobertaSelfAttention / LoraWrapperRoberta (notebook 02)
    data, qa      GLUE / SQuAD loading (hub or local), tokenisation, sliding windows, post-processing
    metrics       GLUE and SQuAD v1/v2 metrics, offline
    benchmark/    the Trainer-based GLUE / SQuAD benchmark, its results and references (notebooks 04, 05)
    peft_interop  to_peft / from_peft (PEFT's adapter format)
    peft_backend  building and reloading PEFT / QLoRA models (bitsandbytes 4-bit)
    qlora         what 4-bit storage does to an adapter: merging, rounding
    measure/      speed and memory measurement (benchmarks/, notebooks 03 and 06)

Heavy modules (transformers, datasets, peft) are imported lazily, on first use of their names.
"""

from importlib import import_module

from loralib.adapters import (
    adapter_state_dict,
    load_adapters,
    load_lora,
    lora_state_dict,
    save_adapters,
    save_lora,
)
from loralib.compat.microsoft import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvLoRA,
    Embedding,
    Linear,
    LoRALayer,
    MergedLinear,
)
from loralib.config import LoraConfig
from loralib.injection import (
    find_targets,
    inject_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from loralib.layers import LoraEmbedding, LoraLayer, LoraLinear
from loralib.named import (
    active_adapter,
    adapter_batch,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    set_adapter,
    using_adapter,
)
from loralib.utils import count_parameters, output_dir, print_versions, set_seed

__version__ = "0.1.0"

_LAZY = {
    "default_model_id": "loralib.tiny",
    "to_peft": "loralib.peft_interop",
    "from_peft": "loralib.peft_interop",
    "to_peft_all": "loralib.peft_interop",
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
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvLoRA",
    "Embedding",
    "Linear",
    "LoRALayer",
    "LoraConfig",
    "MergedLinear",
    "active_adapter",
    "adapter_batch",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "load_adapters",
    "save_adapters",
    "set_adapter",
    "using_adapter",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "count_parameters",
    "find_targets",
    "inject_lora",
    "load_lora",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "output_dir",
    "print_versions",
    "save_lora",
    "set_seed",
    "unload_lora",
    "unmerge_lora",
    *_LAZY,
]
