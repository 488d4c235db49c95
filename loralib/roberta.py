"""The seed article's hand-written RoBERTa LoRA, reproduced against transformers 5.x and made solid.

Two classes, as in the article (Montinger/Transformer-Workbench, LoRA-from-scratch/LoraWrapperRoberta.py):

`LoraRobertaSelfAttention(RobertaSelfAttention)` adds `lora_query_matrix_A/B` and `lora_value_matrix_A/B`
and a `forward` copied from the installed transformers (5.23.0): the stock forward with `self.query(x)` and
`self.value(x)` replaced by `self.lora_query(x)` / `self.lora_value(x)`. Everything else (past_key_values,
dispatch to eager / sdpa / any `ALL_ATTENTION_FUNCTIONS` backend, dropout, returned attention weights) is
the stock code, so with B = 0 it computes exactly what the stock layer does (tests/test_02_roberta.py
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

`LoraWrapperRoberta(nn.Module)` loads a `RobertaModel` (hub id or local directory) and its tokenizer,
swaps every `RobertaSelfAttention` for the LoRA subclass keeping the pretrained weights (checked: the
state dict before and after the swap is identical apart from the new LoRA tensors), freezes all but
LoRA, the head and (as flagged) biases, layer norms and embeddings, and puts a task head (LayerNorm,
Dropout, Linear; the article's `finetune_head_*`) on top: GLUE classification / regression on the <s>
token, or SQuAD start/end logits per token. `forward` returns a transformers `ModelOutput` with `.loss`
when labels are given, so it plugs into the HF `Trainer` and `model(**batch)` loops. `save_lora` /
`from_lora` store the trained tensors plus everything needed to rebuild the wrapper.

SQuAD v2, and why the article's run collapsed on unanswerable questions (NoAns exact 4.8%, EM 41.2):
its data code labelled unanswerable questions start = end = -1 and its loss ignored -1, so the span head
never learned what "no answer" looks like; a third output, a sigmoid "no answer" probability on <s>, was
trained but only handed to the squad_v2 metric as `no_answer_probability`, whose headline EM/F1 use
threshold 1.0 (never exceeded by a probability), so every question got a span. The article's own
results file shows validation best_exact 76.0 at threshold ~0.19: the signal was there, the decision
rule never used it. Here "squad_v2" uses the standard null-span formulation (BERT, HF run_qa): an
unanswerable question (or a window without the answer) is labelled start = end = 0, the <s> token, and
trains like any span; at inference the null score start[0] + end[0] is compared with the best non-null
span score: no answer iff null - best_span > `null_score_diff_threshold` (0 by default; tune it on dev
data). `squad_null_decision` does that for one window of tokens; aggregating windows of a long context
(minimum null score over windows, as HF) is `loralib.qa`'s job.

Not here: cross-attention (RobertaCrossAttention is a separate class in transformers 5 and is not
adapted; the wrapper is encoder-only, as the article's), LoRA on other layers or models (use
`loralib.inject_lora`), merging the update into W, datasets, SQuAD windowing and metrics.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import math
import os
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from loralib.adapters import check_format_version, check_metadata, read_adapter, write_adapter
from loralib.checks import check_alpha, check_dropout, check_rank
from loralib.layers import adapter_dtype

FORMULATIONS = ("article", "scaled")
TASK_TYPES = ("glue", "squad_v1", "squad_v2")
WRAPPER_FORMAT = "loralib-roberta-wrapper"
WRAPPER_FORMAT_VERSION = 1
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
            "tests/test_02_roberta.py (it compares outputs with the stock layer) and, if it fails, re-copy the "
            "forward (see loralib.roberta.forward_source_diff()).",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_lora_args(r: int, formulation: str, lora_alpha: float | None, lora_dropout: float) -> None:
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
        _check_lora_args(r, formulation, lora_alpha, lora_dropout)
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
    _check_lora_args(r, formulation, lora_alpha, lora_dropout)
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


def first_update_norm(
    formulation: str,
    lr: float,
    hidden_size: int = 768,
    r: int = 8,
    n_tokens: int = 256,
    seed: int = 0,
) -> float:
    """Frobenius norm of the query weight change s * B @ A after one AdamW step from B = 0.

    One random roberta-sized attention layer, random inputs, a fixed random linear loss; everything
    but the formulation and lr is seeded identically. Comparing formulations shows why the article's
    unscaled N(0, 1) A needed a much smaller learning rate than kaiming-uniform A.
    """
    from transformers import RobertaConfig

    heads = max(1, hidden_size // 64)
    cfg = RobertaConfig(
        hidden_size=hidden_size,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed the layer's init without touching the caller's RNG
        torch.manual_seed(seed)
        layer = LoraRobertaSelfAttention(cfg, r=r, formulation=formulation).eval()
    x = torch.randn(1, n_tokens, hidden_size, generator=gen)
    target = torch.randn(1, n_tokens, hidden_size, generator=gen)
    params = [layer.lora_query_matrix_A, layer.lora_query_matrix_B]
    for p in layer.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    (layer(x)[0] * target).sum().backward()
    opt.step()
    with torch.no_grad():
        return float(layer.lora_delta_weight("query").norm())


RECIPE_LR = {"article": 4e-5, "scaled": 5e-4}  # the article's script; PEFT / LoRA-paper RoBERTa-base runs


def plot_first_update_norms(
    lrs: tuple[float, ...] = (1e-5, 4e-5, 1e-4, 5e-4, 1e-3),
    hidden_size: int = 768,
    r: int = 8,
    ax=None,
):
    """Plot `first_update_norm` against the learning rate for both formulations, starring RECIPE_LR.

    Returns (figure, {formulation: [norm per lr in lrs]}).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    norms: dict[str, list[float]] = {}
    for formulation, color in (("article", "tab:red"), ("scaled", "tab:blue")):
        norms[formulation] = [first_update_norm(formulation, lr, hidden_size, r) for lr in lrs]
        ax.plot(lrs, norms[formulation], "o-", color=color, label=f"{formulation}")
        lr = RECIPE_LR[formulation]
        at_recipe = (
            norms[formulation][list(lrs).index(lr)]
            if lr in lrs
            else first_update_norm(formulation, lr, hidden_size, r)
        )
        ax.plot(
            [lr],
            [at_recipe],
            "*",
            ms=16,
            color=color,
            label=f"{formulation} at its recipe lr {lr:g}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="||s * B @ A|| after one AdamW step",
        title=f"First LoRA update of W_q (hidden {hidden_size}, r {r})",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, norms


# ---------------------------------------------------------------- the wrapper


def squad_null_decision(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, torch.Tensor]:
    """SQuAD v2 decision for one window per row: best span vs the null (<s>) span.

    start_logits, end_logits: (batch, seq). context_mask: (batch, seq) bool, True where an answer may
    lie (context tokens); None allows every position but 0. The best non-null span maximises
    start[i] + end[j] with i <= j < i + max_answer_length inside the context; the null score is
    start[0] + end[0]. Returns start, end (the span; (0, 0) where no answer is predicted), span_score,
    null_score, score_diff = null - span, and no_answer = score_diff > null_score_diff_threshold.
    """
    if start_logits.shape != end_logits.shape or start_logits.dim() != 2:
        raise ValueError(
            f"start/end logits must both be (batch, seq), got {tuple(start_logits.shape)} and "
            f"{tuple(end_logits.shape)}."
        )
    if max_answer_length < 1:
        raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}.")
    b, n = start_logits.shape
    start_logits, end_logits = start_logits.float(), end_logits.float()
    if context_mask is None:
        context_mask = torch.ones(b, n, dtype=torch.bool, device=start_logits.device)
        context_mask[:, 0] = False
    context_mask = context_mask.bool()
    i = torch.arange(n, device=start_logits.device)
    band = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_length)  # (start, end)
    allowed = band[None] & context_mask[:, :, None] & context_mask[:, None, :]
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    span_score, flat = scores.view(b, -1).max(dim=1)
    start, end = flat // n, flat % n
    null_score = start_logits[:, 0] + end_logits[:, 0]
    score_diff = null_score - span_score  # +inf where the window has no valid span
    no_answer = score_diff > null_score_diff_threshold
    zero = torch.zeros_like(start)
    return {
        "start": torch.where(no_answer, zero, start),
        "end": torch.where(no_answer, zero, end),
        "span_score": span_score,
        "null_score": null_score,
        "score_diff": score_diff,
        "no_answer": no_answer,
    }


def _base_fingerprint(model: nn.Module) -> str:
    # A few frozen tensors identify the base checkpoint: loading an adapter onto another base is caught.
    h = hashlib.sha256()
    emb = model.embeddings.word_embeddings.weight.detach()
    h.update(emb[:16].float().cpu().contiguous().numpy().tobytes())
    first = next(m for _, m in lora_attention_layers(model))
    h.update(first.query.weight.detach()[:16].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LoraWrapperRoberta(nn.Module):
    """RoBERTa with hand-written LoRA on query/value and a task head (the article's wrapper, made solid).

    Args:
        task_type: "glue" (sequence classification / regression on <s>), "squad_v1" or "squad_v2"
            (start/end logits per token; v2 uses the null-span decision, see the module docstring).
        num_classes: number of GLUE labels (required for "glue"); 1 means regression (STS-B). SQuAD
            always has 2 outputs (start, end); pass None or 2.
        dropout_rate: the head's dropout.
        model_id: hub id or local directory of the RoBERTa checkpoint (recorded in saved adapters).
        lora_rank, formulation, lora_alpha, lora_dropout: see `LoraRobertaSelfAttention`.
        train_biases: every bias of the RoBERTa body trains (as the article: "bias" in the name, so layer
            norm biases and the unused pooler's bias too).
        train_embedding: every parameter of the embedding block trains (article: "embeddings" in the name).
        train_layer_norms: every LayerNorm of the body trains (article: "LayerNorm" in the name).
        attn_implementation: "eager", "sdpa", ... passed to `from_pretrained`; None = transformers' default.
        add_pooling_layer: keep RobertaModel's pooler. It is unused by the heads (they read the <s> hidden
            state), and roberta-base ships no pooler weights, but the article kept it and counted its bias
            among the 420,098 trainable parameters (768 of them never get a gradient).
        regression_range: for num_classes=1, outputs are squashed to (low, high) with a sigmoid, as the
            article's sigmoid(x) * 5 for STS-B; None gives a plain linear output.
        null_score_diff_threshold: SQuAD v2 no-answer threshold used by `predict_spans`.
        base_model, tokenizer: an already built `RobertaModel` (and tokenizer, may be None) to use instead
            of loading `model_id`; then model_id is only recorded.
    """

    def __init__(
        self,
        task_type: str,
        num_classes: int | None = None,
        dropout_rate: float = 0.1,
        model_id: str = "FacebookAI/roberta-base",
        lora_rank: int = 8,
        train_biases: bool = True,
        train_embedding: bool = False,
        train_layer_norms: bool = True,
        formulation: str = "scaled",
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        attn_implementation: str | None = None,
        add_pooling_layer: bool = True,
        regression_range: tuple[float, float] | None = (0.0, 5.0),
        null_score_diff_threshold: float = 0.0,
        base_model: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(task_type, str) or task_type.lower() not in (*TASK_TYPES, "squad"):
            raise ValueError(
                f"unknown task_type {task_type!r}; choose one of {TASK_TYPES} ('squad' means 'squad_v1')."
            )
        task_type = task_type.lower()
        task_type = "squad_v1" if task_type == "squad" else task_type
        if task_type == "glue":
            if num_classes is None:
                raise ValueError(
                    "task_type='glue' needs num_classes: the number of labels (2 for SST-2, 3 for MNLI), or 1 "
                    "for the STS-B regression."
                )
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        else:
            if num_classes not in (None, 2):
                raise ValueError(
                    f"{task_type} has exactly 2 outputs per token (start, end); got num_classes={num_classes}. "
                    "SQuAD v2's no-answer is the <s> span here, not a third output (see the module docstring)."
                )
            num_classes = 2
        _check_lora_args(lora_rank, formulation, lora_alpha, lora_dropout)
        check_dropout(dropout_rate, "dropout_rate")
        if regression_range is not None:
            low, high = (float(v) for v in regression_range)
            if not low < high:
                raise ValueError(
                    f"regression_range must be (low, high) with low < high, got {regression_range}."
                )
            regression_range = (low, high)

        # 1. The base model and tokenizer.
        from transformers import AutoTokenizer, RobertaModel

        if base_model is None:
            kwargs = {"add_pooling_layer": add_pooling_layer}
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            base_model = RobertaModel.from_pretrained(model_id, **kwargs)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_id)
        else:
            if not isinstance(base_model, RobertaModel):
                raise TypeError(f"base_model must be a RobertaModel, got {type(base_model).__name__}.")
            if attn_implementation is not None:
                base_model.set_attn_implementation(attn_implementation)
            add_pooling_layer = base_model.pooler is not None
        self.model_id = str(model_id)
        self.tokenizer = tokenizer
        self.model = base_model
        self.model_config = base_model.config

        self.task_type = task_type
        self.num_classes = num_classes
        self.dropout_rate = float(dropout_rate)
        self.lora_rank = lora_rank
        self.formulation = formulation
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.train_biases = bool(train_biases)
        self.train_embedding = bool(train_embedding)
        self.train_layer_norms = bool(train_layer_norms)
        self.add_pooling_layer = bool(add_pooling_layer)
        self.regression_range = regression_range
        self.null_score_diff_threshold = float(null_score_diff_threshold)
        self.base_model_param_count = sum(p.numel() for p in base_model.parameters())

        # 2. The task head (the article's names; it trains in full).
        d_model = self.model_config.hidden_size
        self.d_model = d_model
        self.finetune_head_norm = nn.LayerNorm(d_model)
        self.finetune_head_dropout = nn.Dropout(dropout_rate)
        self.finetune_head_classifier = nn.Linear(d_model, num_classes)

        # 3. LoRA in, everything else frozen as flagged.
        self.replaced_modules = replace_self_attention(
            self.model, r=lora_rank, formulation=formulation, lora_alpha=lora_alpha, lora_dropout=lora_dropout
        )
        self.freeze_parameters_except_lora_and_bias()

    def freeze_parameters_except_lora_and_bias(self) -> None:
        """Freeze the body except LoRA and the flagged biases / layer norms / embeddings; the head trains."""
        layer_norm_params = {
            id(p) for m in self.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        }
        embedding_params = {id(p) for p in self.model.embeddings.parameters()}
        for name, p in self.model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            p.requires_grad_(
                leaf in LORA_PARAM_NAMES
                or (self.train_biases and leaf == "bias")
                or (self.train_embedding and id(p) in embedding_params)
                or (self.train_layer_norms and id(p) in layer_norm_params)
            )
        for module in (self.finetune_head_norm, self.finetune_head_classifier):
            for p in module.parameters():
                p.requires_grad_(True)

    @property
    def is_regression(self) -> bool:
        return self.task_type == "glue" and self.num_classes == 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput | QuestionAnsweringModelOutput:
        """GLUE: `.logits` (batch, num_classes) and, with `labels`, `.loss` (cross-entropy, or MSE for
        num_classes=1). SQuAD: `.start_logits`/`.end_logits` (batch, seq) and, with start/end positions,
        `.loss` = mean of the two cross-entropies (positions outside the window are ignored, as HF)."""
        squad = self.task_type != "glue"
        if squad and labels is not None:
            raise ValueError(f"{self.task_type} trains on start_positions/end_positions, not labels.")
        if not squad and (start_positions is not None or end_positions is not None):
            raise ValueError("task_type='glue' trains on labels, not start_positions/end_positions.")
        if (start_positions is None) != (end_positions is None):
            raise ValueError("pass both start_positions and end_positions, or neither.")
        hidden = self.model(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        if squad:
            return self._forward_squad(hidden, start_positions, end_positions)
        return self._forward_glue(hidden[:, 0, :], labels)  # the <s> token

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.finetune_head_classifier(self.finetune_head_dropout(self.finetune_head_norm(x)))

    def _forward_glue(self, cls: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
        logits = self._head(cls)
        if self.is_regression and self.regression_range is not None:
            low, high = self.regression_range
            logits = low + (high - low) * torch.sigmoid(logits)
        loss = None
        if labels is not None:
            if self.is_regression:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = F.cross_entropy(logits, labels.view(-1).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _forward_squad(self, hidden, start_positions, end_positions) -> QuestionAnsweringModelOutput:
        logits = self._head(hidden)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None:
            # As HF's QA heads: positions past the window are clamped to seq_len and ignored.
            n = start_logits.size(1)
            sp = start_positions.view(-1).long().clamp(0, n)
            ep = end_positions.view(-1).long().clamp(0, n)
            loss = (
                F.cross_entropy(start_logits, sp, ignore_index=n)
                + F.cross_entropy(end_logits, ep, ignore_index=n)
            ) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)

    def predict_spans(
        self,
        start_logits: torch.Tensor,
        end_logits: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        max_answer_length: int = 30,
    ) -> dict[str, torch.Tensor]:
        """`squad_null_decision` with this model's threshold; for squad_v1 no-answer is never chosen."""
        if self.task_type == "glue":
            raise ValueError("predict_spans is for the squad task types.")
        out = squad_null_decision(
            start_logits,
            end_logits,
            context_mask,
            max_answer_length,
            self.null_score_diff_threshold if self.task_type == "squad_v2" else float("inf"),
        )
        return out

    # ------------------------------------------------------------ save / load

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every LoRA matrix and every tensor that trains (head, biases, norms...), detached."""
        return {
            n: p.detach()
            for n, p in self.named_parameters()
            if p.requires_grad or n.rsplit(".", 1)[-1] in LORA_PARAM_NAMES
        }

    def lora_metadata(self) -> dict[str, Any]:
        """Everything `from_lora` needs to rebuild this wrapper (JSON-able)."""
        import transformers

        return {
            "format": WRAPPER_FORMAT,
            "format_version": WRAPPER_FORMAT_VERSION,
            "model_id": self.model_id,
            "task_type": self.task_type,
            "num_classes": self.num_classes,
            "dropout_rate": self.dropout_rate,
            "lora_rank": self.lora_rank,
            "formulation": self.formulation,
            "lora_alpha": self.lora_alpha,
            "lora_scaling": next(m for _, m in lora_attention_layers(self.model)).lora_scaling,
            "lora_dropout": self.lora_dropout,
            "train_biases": self.train_biases,
            "train_embedding": self.train_embedding,
            "train_layer_norms": self.train_layer_norms,
            "add_pooling_layer": self.add_pooling_layer,
            "regression_range": list(self.regression_range) if self.regression_range else None,
            "null_score_diff_threshold": self.null_score_diff_threshold,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.model_config.num_hidden_layers,
            "replaced_modules": self.replaced_modules,
            "base_fingerprint": _base_fingerprint(self.model),
            "transformers_version": transformers.__version__,
        }

    def save_lora(self, directory: str | os.PathLike, **metadata: Any) -> Path:
        """Write the trained tensors and the metadata to `directory` (adapter.safetensors + lora_config.json,
        both atomically, as `loralib.adapters`); extra keyword metadata is stored too. Returns the weights path."""
        own = self.lora_metadata()
        check_metadata(metadata, tuple(own), "LoraWrapperRoberta.save_lora")
        return write_adapter(directory, self.trainable_state_dict(), {**metadata, **own})

    @classmethod
    def from_lora(
        cls,
        directory: str | os.PathLike,
        model_id: str | None = None,
        strict: bool = True,
        **overrides: Any,
    ) -> LoraWrapperRoberta:
        """Rebuild a wrapper saved by `save_lora`: load the base model (the saved model_id, or `model_id`,
        e.g. a local copy), then the trained tensors. strict=True also requires the same base weights
        (a fingerprint of a few frozen tensors). overrides: constructor arguments to change (e.g.
        attn_implementation, base_model, tokenizer)."""
        cfg, tensors = read_adapter(directory)
        if cfg.get("format") != WRAPPER_FORMAT:
            raise ValueError(
                f"{directory} holds a {cfg.get('format')!r} adapter, not a LoraWrapperRoberta one; load it with "
                "loralib.load_lora(model, dir) instead."
            )
        check_format_version(cfg, WRAPPER_FORMAT_VERSION, directory)
        kwargs: dict[str, Any] = dict(
            task_type=cfg["task_type"],
            num_classes=cfg["num_classes"],
            dropout_rate=cfg["dropout_rate"],
            model_id=model_id or cfg["model_id"],
            lora_rank=cfg["lora_rank"],
            train_biases=cfg["train_biases"],
            train_embedding=cfg["train_embedding"],
            train_layer_norms=cfg["train_layer_norms"],
            formulation=cfg["formulation"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg["lora_dropout"],
            add_pooling_layer=cfg["add_pooling_layer"],
            regression_range=tuple(cfg["regression_range"]) if cfg["regression_range"] else None,
            null_score_diff_threshold=cfg["null_score_diff_threshold"],
        )
        kwargs.update(overrides)
        wrapper = cls(**kwargs)
        wrapper.load_trainable_state(tensors, strict=strict)
        if strict and cfg.get("base_fingerprint") not in (None, _base_fingerprint(wrapper.model)):
            raise ValueError(
                f"the base model {kwargs['model_id']!r} has different weights than the one this adapter was "
                f"trained on ({cfg['model_id']!r}); pass the right model_id, or strict=False to load anyway."
            )
        return wrapper

    def load_trainable_state(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy saved tensors in, checking names and shapes (strict: every trainable tensor must be there)."""
        params = dict(self.named_parameters())
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise ValueError(
                f"the adapter has {len(unknown)} tensors this wrapper lacks, e.g. {unknown[:4]}: different "
                "task type, pooling layer or number of layers?"
            )
        bad = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
            for k, v in tensors.items()
            if tuple(v.shape) != tuple(params[k].shape)
        ]
        if bad:
            raise ValueError(
                "adapter shapes don't fit (different rank, hidden size or classes?): " + "; ".join(bad[:4])
            )
        if strict:
            absent = [k for k in self.trainable_state_dict() if k not in tensors]
            if absent:
                raise ValueError(
                    f"the adapter lacks {len(absent)} tensors this wrapper trains, e.g. {absent[:4]}; were the "
                    "train_* flags different? Pass strict=False to keep the base values for those."
                )
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(dtype=params[k].dtype, device=params[k].device))

    def extra_repr(self) -> str:
        return (
            f"task_type={self.task_type}, num_classes={self.num_classes}, r={self.lora_rank}, "
            f"formulation={self.formulation}, model_id={self.model_id}"
        )
