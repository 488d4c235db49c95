"""The LoRA layers: what they share and the registry (`base`), `LoraLinear` (`linear`, with its
hand-written autograd fast path), `LoraEmbedding` (`embedding`), `LoraConv1d/2d/3d` (`conv`) and GPT-2's `LoraConv1D` (`conv1d`,
registered once transformers is imported); `slots` gives every layer further named adapters. Importing this package registers the torch layer types, so
`lora_class_for(module)` knows them all."""

from loralib.layers.base import (
    LORA_LAYER_TYPES,
    LORA_TENSORS,
    MERGED_KEY,
    LoraKwargs,
    LoraLayer,
    adapter_dtype,
    lora_class_for,
    lora_scaling,
    module_kind,
    register_lora_layer,
    supported_types,
)
from loralib.layers.conv import LoraConv1d, LoraConv2d, LoraConv3d
from loralib.layers.embedding import LoraEmbedding
from loralib.layers.linear import LoraLinear

__all__ = [
    "LORA_LAYER_TYPES",
    "LORA_TENSORS",
    "LoraKwargs",
    "MERGED_KEY",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "adapter_dtype",
    "lora_class_for",
    "lora_scaling",
    "module_kind",
    "register_lora_layer",
    "supported_types",
]
