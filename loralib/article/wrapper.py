"""The seed article's `LoraWrapperRoberta`: RoBERTa with LoRA attention, a task head and its own save format.

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

Covers: the wrapper, its forward and losses, `save_lora` / `from_lora` and the base-model fingerprint
that checks a reload uses the same frozen weights. Not here: the attention class
(`loralib.article.attention`), SQuAD windowing, post-processing and the null decision (`loralib.qa`),
metrics (`loralib.metrics`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from loralib.adapters import (
    check_format_version,
    check_metadata,
    read_adapter,
    tensor_mismatches,
    write_adapter,
)
from loralib.article.attention import (
    LORA_PARAM_NAMES,
    check_article_args,
    lora_attention_layers,
    replace_self_attention,
)
from loralib.checks import check_dropout
from loralib.qa import squad_null_decision

TASK_TYPES = ("glue", "squad_v1", "squad_v2")


WRAPPER_FORMAT = "loralib-roberta-wrapper"


WRAPPER_FORMAT_VERSION = 2  # 2: r (1 said lora_rank; still read)


def _base_fingerprint(model: nn.Module) -> str:
    # A few frozen tensors identify the base checkpoint: loading an adapter onto another base is caught.
    h = hashlib.sha256()
    emb = model.embeddings.word_embeddings.weight.detach()
    h.update(emb[:16].float().cpu().contiguous().numpy().tobytes())
    first = next(m for _, m in lora_attention_layers(model))
    h.update(first.query.weight.detach()[:16].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_task(task_type: str, num_classes: int | None) -> tuple[str, int]:
    """(task type, head outputs): "squad" means "squad_v1"; GLUE needs num_classes, SQuAD has 2."""
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
    return task_type, num_classes


def _check_regression_range(regression_range):
    """(low, high) as floats with low < high, or None."""
    if regression_range is not None:
        low, high = (float(v) for v in regression_range)
        if not low < high:
            raise ValueError(f"regression_range must be (low, high) with low < high, got {regression_range}.")
        regression_range = (low, high)
    return regression_range


def _base_and_tokenizer(model_id, base_model, tokenizer, attn_implementation, add_pooling_layer):
    """(RobertaModel, tokenizer, add_pooling_layer): loaded from `model_id`, or the given model checked."""
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
    return base_model, tokenizer, add_pooling_layer


class LoraWrapperRoberta(nn.Module):
    """RoBERTa with hand-written LoRA on query/value and a task head (the article's wrapper, made solid).

    Args:
        task_type: "glue" (sequence classification / regression on <s>), "squad_v1" or "squad_v2"
            (start/end logits per token; v2 uses the null-span decision, see the module docstring).
        num_classes: number of GLUE labels (required for "glue"); 1 means regression (STS-B). SQuAD
            always has 2 outputs (start, end); pass None or 2.
        dropout_rate: the head's dropout.
        model_id: hub id or local directory of the RoBERTa checkpoint (recorded in saved adapters).
        r, formulation, lora_alpha, lora_dropout: see `LoraRobertaSelfAttention` (lora_rank= is r's former name).
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
        r: int = 8,
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
        task_type, num_classes = _check_task(task_type, num_classes)
        check_article_args(r, formulation, lora_alpha, lora_dropout)
        check_dropout(dropout_rate, "dropout_rate")
        regression_range = _check_regression_range(regression_range)

        # 1. The base model and tokenizer.
        base_model, tokenizer, add_pooling_layer = _base_and_tokenizer(
            model_id, base_model, tokenizer, attn_implementation, add_pooling_layer
        )
        self.model_id = str(model_id)
        self.tokenizer = tokenizer
        self.model = base_model
        self.model_config = base_model.config

        self.task_type = task_type
        self.num_classes = num_classes
        self.dropout_rate = float(dropout_rate)
        self.r = r
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
            self.model, r=r, formulation=formulation, lora_alpha=lora_alpha, lora_dropout=lora_dropout
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
            "r": self.r,
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
            r=cfg["r"] if "r" in cfg else cfg["lora_rank"],  # format_version 1 said lora_rank
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
        unknown, bad = tensor_mismatches(params, tensors)
        if unknown:
            raise ValueError(
                f"the adapter has {len(unknown)} tensors this wrapper lacks, e.g. {unknown[:4]}: different "
                "task type, pooling layer or number of layers?"
            )
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
            f"task_type={self.task_type}, num_classes={self.num_classes}, r={self.r}, "
            f"formulation={self.formulation}, model_id={self.model_id}"
        )
