"""The seed article's hand-written LoRA for RoBERTa (notebook 02): its attention subclass and its wrapper.

    attention      LoraRobertaSelfAttention, replace_self_attention, FORMULATIONS / DEFAULT_LR
    wrapper        LoraWrapperRoberta (task heads, forward, save_lora / from_lora)
    lr_experiment  first_update_norm: why the article's formulation needs a ~10x smaller learning rate

The generic path, LoRA on any nn.Linear, is `loralib.layers` / `loralib.injection`.
"""

from loralib.article.attention import (
    DEFAULT_LR,
    FORMULATIONS,
    LoraRobertaSelfAttention,
    lora_attention_layers,
    replace_self_attention,
)
from loralib.article.wrapper import LoraWrapperRoberta

__all__ = [
    "DEFAULT_LR",
    "FORMULATIONS",
    "LoraRobertaSelfAttention",
    "LoraWrapperRoberta",
    "lora_attention_layers",
    "replace_self_attention",
]
