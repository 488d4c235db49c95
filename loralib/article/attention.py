"""The seed article's `LoraRobertaSelfAttention`, reproduced against transformers 5.x, and the swap.

The article's class, as in the article (Montinger/Transformer-Workbench, LoRA-from-scratch/LoraWrapperRoberta.py):

`LoraRobertaSelfAttention(RobertaSelfAttention)` adds `lora_query_matrix_A/B` and `lora_value_matrix_A/B`
and a `forward` copied from the installed transformers (5.23.0): the stock forward with `self.query(x)` and
`self.value(x)` replaced by `self.lora_query(x)` / `self.lora_value(x)`. Everything else (past_key_values,
dispatch to eager / sdpa / any `ALL_ATTENTION_FUNCTIONS` backend, dropout, returned attention weights) is
the stock code, so with B = 0 it computes exactly what the stock layer does (tests/test_02_article.py
checks that under eager and sdpa with padding). Shapes follow the article and `loralib.LoraLinear`:
A is (r x hidden), B is (hidden x r), and

    lora_query(x) = x W_q^T + b_q + (x A_q^T) B_q^T * s        (the same for value)

which is `LoraLinear`'s y = x W^T + b + x A^T B^T * s. The product is taken as two thin matmuls; the
(hidden x hidden) matrix B @ A, which the article built on every call, is never formed.

Two formulations, chosen by `formulation`:
  "article": A ~ N(0, 1), B = 0, no scaling (s = 1), the article's code. Its training script used lr 4e-5.
  "scaled":  A kaiming-uniform(a=sqrt(5)) as PEFT and microsoft/LoRA, B = 0, s = lora_alpha / r
             (lora_alpha None means alpha = r, s = 1). The usual lr is ~5e-4.
With Adam the first update of B is about lr * sign(grad) whatever A's scale, so the weight change
s * B @ A is proportional to A's scale: N(0, 1) entries are sqrt(3 * hidden) (48x for roberta-base)
larger than kaiming-uniform's (std 1 / sqrt(3 * hidden)). That is why the article's code needed a
roughly ten times smaller learning rate (`first_update_norm` measures it).

Covers: the attention subclass, `replace_self_attention` (the recursive swap, verified to keep every
pretrained tensor), `lora_attention_layers`, the check that the installed transformers still has the
forward this class copies, and the two formulations with their learning rates (`FORMULATIONS`,
`DEFAULT_LR`). Not here: the wrapper with its head and save format (`loralib.article.wrapper`), the
learning-rate experiment (`loralib.article.lr_experiment`), cross-attention (a separate class in
transformers 5, not adapted), LoRA on other layers or models (`loralib.inject_lora`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import math
import textwrap
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from loralib.checks import check_alpha, check_dropout, check_rank
from loralib.layers import adapter_dtype

FORMULATIONS = ("scaled", "article")
# The learning rate each formulation trains with: the article's script (4e-5) and PEFT / the LoRA
# paper's RoBERTa-base runs (5e-4); the benchmark's default and notebook 02's experiment.
DEFAULT_LR = {"scaled": 5e-4, "article": 4e-5}


# sha256 of inspect.getsource(RobertaSelfAttention.forward) in transformers 5.23.0, the forward copied below.
COPIED_FROM_TRANSFORMERS = "5.23.0"


STOCK_FORWARD_SHA256 = "3246d93f74cfeab56609ee0e7bf40edb2e1af5d606e06c0ff3ca42a03d8fea15"


LORA_PARAM_NAMES = (
    "lora_query_matrix_A",
    "lora_query_matrix_B",
    "lora_value_matrix_A",
    "lora_value_matrix_B",
)


_version_warned = False


def stock_forward_source() -> str:
    """Source of the installed transformers' `RobertaSelfAttention.forward`."""
    return textwrap.dedent(inspect.getsource(RobertaSelfAttention.forward))


@functools.lru_cache(maxsize=1)
def stock_forward_matches() -> bool:
    """True when the installed stock forward is byte-identical to the one copied here (5.23.0)."""
    return hashlib.sha256(inspect.getsource(RobertaSelfAttention.forward).encode()).hexdigest() == (
        STOCK_FORWARD_SHA256
    )


def forward_source_diff() -> str:
    """Unified diff from the installed stock forward to `LoraRobertaSelfAttention.forward`."""
    ours = textwrap.dedent(inspect.getsource(LoraRobertaSelfAttention.forward))
    return "".join(
        difflib.unified_diff(
            stock_forward_source().splitlines(keepends=True),
            ours.splitlines(keepends=True),
            fromfile="transformers RobertaSelfAttention.forward",
            tofile="loralib LoraRobertaSelfAttention.forward",
        )
    )


def _warn_if_transformers_changed() -> None:
    global _version_warned
    try:
        matches = stock_forward_matches()
    except OSError:  # no source files installed: nothing to compare, the output tests still apply
        return
    if not _version_warned and not matches:
        _version_warned = True
        import transformers

        warnings.warn(
            f"transformers {transformers.__version__}'s RobertaSelfAttention.forward differs from the "
            f"{COPIED_FROM_TRANSFORMERS} code copied into LoraRobertaSelfAttention.forward; run "
            "tests/test_02_article.py (it compares outputs with the stock layer) and, if it fails, re-copy the "
            "forward (see loralib.article.attention.forward_source_diff()).",
            RuntimeWarning,
            stacklevel=3,
        )


def check_article_args(r: int, formulation: str, lora_alpha: float | None, lora_dropout: float) -> None:
    """Validate the attention layer's r, formulation, lora_alpha and lora_dropout (one wording, `loralib.checks`)."""
    check_rank(r)
    if formulation not in FORMULATIONS:
        raise ValueError(
            f"unknown formulation {formulation!r}; choose 'article' (A ~ N(0,1), no scaling, lr ~4e-5) or "
            "'scaled' (kaiming-uniform A, update times lora_alpha / r, lr ~5e-4)."
        )
    if lora_alpha is not None and formulation == "article":
        raise ValueError(
            "formulation='article' has no scaling (the article's code multiplies by nothing); leave "
            "lora_alpha=None, or use formulation='scaled' to scale the update by lora_alpha / r."
        )
    check_alpha(lora_alpha, "lora_alpha")
    check_dropout(lora_dropout, "lora_dropout")


class LoraRobertaSelfAttention(RobertaSelfAttention):
    """`RobertaSelfAttention` with LoRA on the query and value projections (the article's class).

    Args:
        config, is_causal, layer_idx: as for `RobertaSelfAttention` (transformers 5.x).
        r: rank of the updates.
        formulation: "scaled" (kaiming-uniform A, update times lora_alpha / r) or "article"
            (A ~ N(0, 1), unscaled).
        lora_alpha: scaling numerator for "scaled"; None means alpha = r (scale 1).
        lora_dropout: dropout on the LoRA path's input (the article had none).

    A is (r x hidden) and B is (hidden x r), as `loralib.LoraLinear`'s lora_A / lora_B; B starts at zero.
    """

    def __init__(
        self,
        config,
        is_causal: bool = False,
        layer_idx: int | None = None,
        r: int = 8,
        formulation: str = "scaled",
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ) -> None:
        check_article_args(r, formulation, lora_alpha, lora_dropout)
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        _warn_if_transformers_changed()
        d_in, d_out = config.hidden_size, self.all_head_size
        self.r = r
        self.formulation = formulation
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.lora_scaling = 1.0 if formulation == "article" else self.lora_alpha / r
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = self.query.weight
        self.lora_query_matrix_A = nn.Parameter(torch.empty(r, d_in, device=w.device, dtype=w.dtype))
        self.lora_query_matrix_B = nn.Parameter(torch.empty(d_out, r, device=w.device, dtype=w.dtype))
        self.lora_value_matrix_A = nn.Parameter(torch.empty(r, d_in, device=w.device, dtype=w.dtype))
        self.lora_value_matrix_B = nn.Parameter(torch.empty(d_out, r, device=w.device, dtype=w.dtype))
        self.reset_lora_parameters()

    @classmethod
    def from_self_attention(
        cls,
        module: RobertaSelfAttention,
        r: int = 8,
        formulation: str = "scaled",
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ) -> LoraRobertaSelfAttention:
        """A LoRA copy of a stock `RobertaSelfAttention`: same weights (copied), config, layer index, mode."""
        if isinstance(module, LoraRobertaSelfAttention):
            raise TypeError("this attention layer already has LoRA; adapt a stock RobertaSelfAttention.")
        if type(module) is not RobertaSelfAttention:
            raise TypeError(
                f"expected a stock RobertaSelfAttention, got {type(module).__name__}; its forward may differ "
                "from the one LoraRobertaSelfAttention copies."
            )
        new = cls(
            module.config,
            is_causal=module.is_causal,
            layer_idx=module.layer_idx,
            r=r,
            formulation=formulation,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
        )
        w = module.query.weight
        new.to(device=w.device, dtype=w.dtype)
        keep = adapter_dtype(w.dtype)  # fp32 A and B on a half-precision base, as LoraLinear
        for name in LORA_PARAM_NAMES:
            getattr(new, name).data = getattr(new, name).data.to(keep)
        result = new.load_state_dict(module.state_dict(), strict=False)
        if result.unexpected_keys or sorted(result.missing_keys) != sorted(LORA_PARAM_NAMES):
            raise RuntimeError(
                f"copying RobertaSelfAttention weights into the LoRA layer went wrong: unexpected "
                f"{result.unexpected_keys}, missing {result.missing_keys} (only the LoRA matrices may be missing). "
                "The installed transformers' RobertaSelfAttention has different parameters than expected."
            )
        new.train(module.training)
        return new

    def reset_lora_parameters(self) -> None:
        """Re-draw A (N(0, 1) for "article", kaiming-uniform for "scaled") and zero B."""
        with torch.no_grad():
            for a in (self.lora_query_matrix_A, self.lora_value_matrix_A):
                if self.formulation == "article":
                    nn.init.normal_(a, mean=0.0, std=1.0)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_query_matrix_B)
            nn.init.zeros_(self.lora_value_matrix_B)

    def _lora_update(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (x A^T) B^T: two thin matmuls, O(n d r), instead of forming the (d x d) matrix B @ A per call.
        if a.dtype != x.dtype:  # fp32 adapter weights on a half-precision base compute in its dtype
            a, b = a.to(x.dtype), b.to(x.dtype)
        xa = F.linear(self.lora_dropout(x), a)
        if self.lora_scaling != 1.0:
            xa = xa * self.lora_scaling  # scale the (n x r) intermediate, the cheapest place
        return F.linear(xa, b)

    def lora_query(self, x: torch.Tensor) -> torch.Tensor:
        """x W_q^T + b_q + (x A_q^T) B_q^T * s."""
        return self.query(x) + self._lora_update(x, self.lora_query_matrix_A, self.lora_query_matrix_B)

    def lora_value(self, x: torch.Tensor) -> torch.Tensor:
        """x W_v^T + b_v + (x A_v^T) B_v^T * s."""
        return self.value(x) + self._lora_update(x, self.lora_value_matrix_A, self.lora_value_matrix_B)

    def lora_delta_weight(self, which: str = "query") -> torch.Tensor:
        """The weight change s * B @ A of "query" or "value", shape (hidden, hidden) (for analysis only)."""
        if which not in ("query", "value"):
            raise ValueError(f"which must be 'query' or 'value', got {which!r}.")
        a = getattr(self, f"lora_{which}_matrix_A")
        b = getattr(self, f"lora_{which}_matrix_B")
        return (b @ a) * self.lora_scaling

    # Copied from transformers 5.23.0 RobertaSelfAttention.forward; only self.query / self.value changed.
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)

        # get all proj
        query_layer = self.lora_query(hidden_states).view(*hidden_shape).transpose(1, 2)
        key_layer = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)
        value_layer = self.lora_value(hidden_states).view(*hidden_shape).transpose(1, 2)

        if past_key_values is not None:
            # decoder-only roberta can have a simple dynamic cache for example
            current_past_key_values = past_key_values
            if isinstance(past_key_values, EncoderDecoderCache):
                current_past_key_values = past_key_values.self_attention_cache

            # save all key/value_layer to cache to be re-used for fast auto-regressive generation
            key_layer, value_layer = current_past_key_values.update(key_layer, value_layer, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_layer,
            key_layer,
            value_layer,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return attn_output, attn_weights

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, formulation={self.formulation}, scaling={self.lora_scaling:g}, "
            f"lora_dropout={self.lora_dropout_p:g}"
        )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Same storage, shape and strides: equal without reading 124M numbers (most of the model is untouched).
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def replace_self_attention(
    model: nn.Module,
    r: int = 8,
    formulation: str = "scaled",
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
) -> list[str]:
    """Swap every stock `RobertaSelfAttention` in `model` (recursively) for `LoraRobertaSelfAttention`.

    Returns the qualified names replaced. Verifies the swap: the model's state dict afterwards holds
    exactly the same tensors (bit for bit) under the same names as before, plus the LoRA matrices.
    """
    check_article_args(r, formulation, lora_alpha, lora_dropout)
    before = model.state_dict()  # references to the old tensors, which stay alive until the check
    replaced: list[str] = []

    def recurse(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if type(child) is RobertaSelfAttention:
                new = LoraRobertaSelfAttention.from_self_attention(
                    child, r=r, formulation=formulation, lora_alpha=lora_alpha, lora_dropout=lora_dropout
                )
                setattr(module, name, new)
                replaced.append(qualified)
            else:
                recurse(child, qualified + ".")

    recurse(model, "")
    if not replaced:
        raise ValueError(
            f"{type(model).__name__} contains no stock RobertaSelfAttention to replace (already adapted, or "
            "not a RoBERTa model?)."
        )
    after = model.state_dict()
    lora_keys = {k for k in after if k.rsplit(".", 1)[-1] in LORA_PARAM_NAMES}
    if set(after) - lora_keys != set(before):
        raise RuntimeError(
            f"the swap changed the state dict's keys: lost {sorted(set(before) - set(after))[:5]}, "
            f"gained {sorted(set(after) - lora_keys - set(before))[:5]}."
        )
    changed = [
        k for k in before if not _same_tensor(before[k], after[k]) and not torch.equal(before[k], after[k])
    ]
    if changed:
        raise RuntimeError(f"the swap changed pretrained tensors (left random or dropped?): {changed[:5]}")
    if len(lora_keys) != 4 * len(replaced):
        raise RuntimeError(f"expected {4 * len(replaced)} LoRA tensors, found {len(lora_keys)}.")
    return replaced


def lora_attention_layers(model: nn.Module):
    """Yield (qualified name, layer) for every `LoraRobertaSelfAttention` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraRobertaSelfAttention):
            yield name, module
