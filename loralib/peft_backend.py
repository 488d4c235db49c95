"""Building and reloading PEFT and QLoRA models: the benchmark's "peft" and "qlora" backends.

Covers: `load_base_model` (RoBERTa for classification / regression / question answering, optionally
in 4-bit nf4 with double quantisation through `bnb_config`; heads stay full precision),
`pin_cpu_4bit_path` (one bitsandbytes CPU path on every CPU), `build_peft_model` (the article's
`peft.LoraConfig`), `make_optimizer` (bitsandbytes' 8-bit AdamW for quantised models, torch AdamW
otherwise), `quantized_linears` / `is_quantized` (what got quantised), and `save_peft_model` /
`load_peft_model` (PEFT's adapter format plus a small `loralib_task.json` so a reload needs no
`num_labels`). Not here: merging and rounding analysis (`loralib.qlora`), the training loop
(`loralib.benchmark`), converting loralib adapters to PEFT's format (`loralib.peft_interop`).

Precision: 4-bit weights are stored as packed uint8 (two nf4 codes per byte) plus per-block scales; a
forward pass dequantises them to the compute dtype: bf16 on GPUs with native bf16, fp16 on other GPUs,
fp32 on CPU (bf16 matmuls on a CPU without bf16 units are far slower: about 40x on the 2-core machine
this was developed on). The task heads (`classifier`, `qa_outputs`) are never quantised: quantising a
freshly initialised head that is also fully trained breaks training.

Needs the optional dependencies `peft` and `bitsandbytes` (bitsandbytes 0.50 runs nf4 and 8-bit AdamW on
CPU as well as CUDA). Both are imported lazily, so `import loralib` works without them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralib.checks import (
    check_bool,
    check_choice,
    check_dropout,
    check_names,
    check_number,
    check_rank,
    read_json,
)
from loralib.files import atomic_directory
from loralib.injection import TASK_HEADS
from loralib.utils import default_device

# The article's PEFT recipe: all attention and feed-forward linears, plus norms and heads trained in full.
ARTICLE_TARGETS: tuple[str, ...] = ("query", "key", "value", "intermediate.dense", "output.dense")


ARTICLE_MODULES_TO_SAVE: tuple[str, ...] = ("LayerNorm", *TASK_HEADS)


# Never quantised: they start random and train in full, so 4-bit rounding would cripple them.
HEAD_MODULES: tuple[str, ...] = TASK_HEADS


TASK_KINDS: tuple[str, ...] = ("classification", "regression", "question_answering")


TASK_FILE = "loralib_task.json"


def _peft_task_type(task_kind: str) -> str:
    return "QUESTION_ANS" if task_kind == "question_answering" else "SEQ_CLS"


def _auto_class(task_kind: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return (
        AutoModelForQuestionAnswering
        if task_kind == "question_answering"
        else AutoModelForSequenceClassification
    )


def compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 on GPUs with native bf16, fp16 on other GPUs (a T4
    emulates bf16, slowly), fp32 on CPU (bf16 matmuls are far slower there)."""
    from loralib.utils import native_bf16

    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(dev) else torch.float16


def bnb_config(dtype: torch.dtype | None = None, skip_modules: Sequence[str] = HEAD_MODULES):
    """The article's `BitsAndBytesConfig`: 4-bit nf4, double quantisation, heads left in full precision.

    dtype: compute dtype of the 4-bit layers (default `compute_dtype()`: bf16 on CUDA, fp32 on CPU).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype is not None else compute_dtype(),
        llm_int8_skip_modules=list(skip_modules),
    )


def _label_kwargs(task_kind: str, num_labels: int | None, id2label: dict[int, str] | None) -> dict[str, Any]:
    """from_pretrained keyword arguments that give the head the right size, labels and loss."""
    if task_kind not in TASK_KINDS:
        raise ValueError(f"unknown task_kind {task_kind!r}; choose one of {TASK_KINDS}.")
    if task_kind == "question_answering":
        if num_labels not in (None, 2):
            raise ValueError(
                f"question answering predicts start and end logits (num_labels=2), got num_labels={num_labels!r}; "
                "pass num_labels=None."
            )
        if id2label:
            raise ValueError("id2label makes no sense for question answering; pass id2label=None.")
        return {}
    if task_kind == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"regression has one output (num_labels=1), got num_labels={num_labels!r}.")
        return {"num_labels": 1, "problem_type": "regression"}
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is None:
            num_labels = len(id2label)
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(
                f"id2label must have the keys 0..{num_labels - 1} (num_labels={num_labels}), got {sorted(id2label)}."
            )
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
        raise ValueError(
            f"classification needs num_labels >= 2 (or id2label), got num_labels={num_labels!r}; "
            "for one output use task_kind='regression'."
        )
    out: dict[str, Any] = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if id2label is not None:
        out["id2label"] = id2label
        out["label2id"] = {v: k for k, v in id2label.items()}
    return out


def _device_map_target(dev: torch.device) -> int | str:
    if dev.type == "cuda":
        return dev.index if dev.index is not None else torch.cuda.current_device()
    return str(dev)


def load_base_model(
    model_id: str,
    task_kind: str,
    num_labels: int | None = None,
    quantize: bool = False,
    id2label: dict[int, str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> nn.Module:
    """RoBERTa (or any encoder) with the task's head, in 4-bit nf4 (`quantize=True`) or full precision.

    The head is freshly initialised from the torch RNG: seed before calling for a reproducible model.
    device: default CUDA when available, else CPU. A 4-bit model is quantised while it is moved there.
    dtype: compute dtype of the 4-bit layers (default `compute_dtype(device)`).
    dequantize: with quantize, turn the 4-bit weights back into fp32 `nn.Linear`s: exactly the weights
        a QLoRA adapter was trained against (W_nf4), without bitsandbytes at inference.
    """
    kwargs = _label_kwargs(task_kind, num_labels, id2label)
    dev = torch.device(device) if device is not None else default_device()
    cls = _auto_class(task_kind)
    if dequantize and not quantize:
        raise ValueError(
            "dequantize=True needs quantize=True (it undoes the 4-bit storage, not the rounding)."
        )
    if not quantize:
        return cls.from_pretrained(model_id, **kwargs).to(dev)
    model = cls.from_pretrained(
        model_id,
        quantization_config=bnb_config(dtype if dtype is not None else compute_dtype(dev)),
        # bitsandbytes quantises while the weights are moved to the device, so place them at load time.
        device_map={"": _device_map_target(dev)},
        **kwargs,
    )
    pin_cpu_4bit_path(model)
    if dequantize:
        from transformers.utils import logging as hf_logging

        # "The modules are dequantized in torch.float32 and casted to torch.float32": what was asked for.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = model.dequantize(dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        # Stale flags would make PEFT and the Trainer treat the plain fp32 model as quantised.
        for attr in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def pin_cpu_4bit_path(model: nn.Module) -> int:
    """Make every bitsandbytes `Linear4bit` in `model` take one path, training or not; return how many.

    On CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later) bitsandbytes 0.50 repacks a 4-bit
    weight *in place*, the first time the layer runs in eval mode without grad (as
    `Trainer.evaluate()` does), into an inference-only bf16 layout. Nothing packs it back on
    `train()`: the packed path has no autograd (training then fails with "a view of a leaf Variable
    ... in-place operation"), adds the bias in place and computes in bf16 instead of the compute
    dtype; unpacking is lossy (absmax goes through bf16). The instance attribute
    `support_avx512bf16_for_cpu` gates the repacking, so clearing it keeps training, evaluation,
    reload and merge on the same nf4 path on every CPU. A layer already repacked is refused: its
    weights went through bf16, so rebuild or reload the model instead.
    """
    import bitsandbytes as bnb

    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):  # LinearNF4 / LinearFP4 subclass it
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"{name or 'the model'} was already repacked by bitsandbytes into its bf16 CPU inference "
                "layout (lossy); build or reload the model with loralib.peft_backend (load_base_model, "
                "build_peft_model, load_peft_model), which prevents the repacking."
            )
        module.support_avx512bf16_for_cpu = False
        n += 1
    return n


def quantized_linears(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {"class", "storage_dtype", "compute_dtype", "quant_type"}} for every linear layer.

    Linears wrapped by PEFT are reported under their own name (the `base_layer` is what is quantised),
    so the dict answers "is `...attention.self.query` 4-bit, stored how?" directly.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        elif ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B")):
            continue
        state = getattr(module.weight, "quant_state", None)
        out[name] = {
            "class": type(module).__name__,
            "storage_dtype": module.weight.dtype,
            "compute_dtype": getattr(module, "compute_dtype", None) or module.weight.dtype,
            "quant_type": getattr(state, "quant_type", None),
        }
    return out


def is_quantized(model: nn.Module) -> bool:
    """True when any parameter is a bitsandbytes 4-bit or 8-bit tensor."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def build_peft_model(
    model_id: str,
    task_kind: str,
    num_labels: int | None,
    quantize: bool,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.1,
    target_modules: Sequence[str] | str = ARTICLE_TARGETS,
    modules_to_save: Sequence[str] | None = ARTICLE_MODULES_TO_SAVE,
    bias: str = "none",
    id2label: dict[int, str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    use_rslora: bool = False,
):
    """The article's PEFT model: a task model (4-bit nf4 if `quantize`) wrapped by `get_peft_model`.

    model_id: hub id or directory. task_kind: "classification" | "regression" | "question_answering".
    num_labels: classes for classification (regression: None or 1; QA: None or 2).
    quantize: load the base in 4-bit nf4 with double quantisation (QLoRA) and prepare it for k-bit
        training (norms in fp32, base frozen; no gradient checkpointing). Heads stay full precision.
    r, lora_alpha, lora_dropout, target_modules, modules_to_save, bias: `peft.LoraConfig` fields
        (scaling lora_alpha / r; lora_alpha / sqrt(r) with use_rslora); the defaults are the article's. Entries of modules_to_save that name no
        module are ignored by PEFT (the article lists both heads for every task).
    id2label: class names, saved with the adapter. device: default CUDA when available, else CPU.
    dtype: compute dtype of the 4-bit layers (default `compute_dtype(device)`: bf16 on CUDA, fp32 on CPU).
    Seed before calling: the head and the LoRA A matrices are random. Returns a `peft.PeftModel` whose
    trainable parameters are exactly the LoRA matrices, modules_to_save and the biases `bias` asks for.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_bool(quantize, "quantize")
    check_bool(use_rslora, "use_rslora")
    check_rank(r)
    check_number(lora_alpha, "lora_alpha", positive=True)
    check_dropout(lora_dropout, "lora_dropout")
    check_choice(bias, "bias", ("none", "all", "lora_only"))
    if not isinstance(target_modules, str):
        check_names(target_modules, "target_modules", allow_empty=False)
    if modules_to_save is not None:
        check_names(modules_to_save, "modules_to_save")
    base = load_base_model(
        model_id, task_kind, num_labels, quantize=quantize, id2label=id2label, device=device, dtype=dtype
    )
    if quantize:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias=bias,
        task_type=_peft_task_type(task_kind),
        use_rslora=use_rslora,
    )
    try:
        return get_peft_model(base, config)
    except ValueError as e:
        names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)][:12]
        raise ValueError(f"{e}\nLinear modules of {model_id!r} include: {names}") from e


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    eight_bit: bool | None = None,
    loraplus_lr_ratio: float | None = None,
    **adam_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: bitsandbytes' AdamW8bit for quantised models, else torch's.

    eight_bit: None decides by `is_quantized(model)`. Biases and layer-norm weights get no weight decay
    (the Trainer's convention). loraplus_lr_ratio: LoRA+, B at this times lr (`loralib.optim`; None: one
    rate). adam_kwargs: betas, eps. AdamW8bit keeps its two moments in 8 bits (blockwise-quantised) for
    tensors of at least 4096 elements and in fp32 for smaller ones.
    """
    from loralib.optim import param_groups

    check_number(lr, "lr", positive=True, hint="A learning rate such as 2e-4.")
    if eight_bit is not None:
        check_bool(eight_bit, "eight_bit")
    groups = param_groups(model, lr, loraplus_lr_ratio, weight_decay)
    if eight_bit is None:
        eight_bit = is_quantized(model)
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, **adam_kwargs)
    return torch.optim.AdamW(groups, lr=lr, **adam_kwargs)


def _task_kind_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any("QuestionAnswering" in a for a in archs):
        return "question_answering"
    if getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1:
        return "regression"
    return "classification"


def task_metadata(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """What a reload needs besides PEFT's files: task kind, label count and names, quantisation, base."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    task_type = getattr(peft_config, "task_type", None)
    kind = (
        "question_answering"
        if task_type == "QUESTION_ANS" or "QuestionAnswering" in type(base).__name__
        else _task_kind_of(cfg)
    )
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    meta: dict[str, Any] = {
        "format": "loralib-peft-task",
        "task_kind": kind,
        "num_labels": None if kind == "question_answering" else int(cfg.num_labels),
        "id2label": None if kind != "classification" else {str(k): v for k, v in cfg.id2label.items()},
        "problem_type": getattr(cfg, "problem_type", None),
        "quantized": bool(quant) and bool(quant.get("load_in_4bit") or quant.get("_load_in_4bit")),
        "quantization_config": quant,
        "base_model_name_or_path": getattr(peft_config, "base_model_name_or_path", None)
        or getattr(cfg, "_name_or_path", None),
    }
    from loralib.adapters import check_metadata

    check_metadata(extra, tuple(meta), "save_peft_model")
    meta.update(extra)
    return meta


def save_peft_model(model, directory: str | os.PathLike, **metadata: Any) -> Path:
    """`model.save_pretrained(directory)` plus `loralib_task.json` (labels, task kind, quantisation).

    PEFT's adapter_config.json does not record the head's size or label names, so
    `AutoPeftModelForSequenceClassification.from_pretrained(directory)` rebuilds a 2-label head and
    fails (or, for 2 labels, silently loses the names). `load_peft_model(directory)` reads the extra
    file and needs no argument. The directory is written as one atomic unit (`loralib.files.atomic_directory`).
    Extra keyword metadata (task name, ...) is stored too. Returns the directory.
    """
    if not hasattr(model, "peft_config"):
        raise TypeError(
            f"save_peft_model expects a peft.PeftModel, got {type(model).__name__}; for loralib models use "
            "loralib.save_lora() or loralib.peft_interop.to_peft()."
        )
    meta = task_metadata(model, **metadata)
    target = Path(directory)
    with atomic_directory(target) as stage:
        model.save_pretrained(str(stage))
        (stage / TASK_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return target


def read_task_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The `loralib_task.json` of a saved adapter, with id2label keys turned back into ints."""
    path = Path(directory) / TASK_FILE
    if not path.exists():
        cfg = Path(directory) / "adapter_config.json"
        what = "a PEFT adapter without loralib's task file" if cfg.exists() else "not an adapter directory"
        raise FileNotFoundError(
            f"{path} is missing: {directory} is {what}. Save with loralib.peft_backend.save_peft_model(), or load "
            "it with AutoPeftModelForSequenceClassification.from_pretrained(directory, num_labels=N)."
        )
    meta = read_json(path, "loralib's task file (save_peft_model writes it)")
    if not isinstance(meta, dict) or "task_kind" not in meta:
        raise ValueError(
            f"{path} lacks 'task_kind'; re-save the adapter with loralib.peft_backend.save_peft_model()."
        )
    if meta.get("id2label"):
        meta["id2label"] = {int(k): v for k, v in meta["id2label"].items()}
    return meta


def load_peft_model(
    directory: str | os.PathLike,
    quantize: bool | None = None,
    is_trainable: bool = False,
    device: str | torch.device | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
):
    """Reload a `save_peft_model` directory: same head size, labels and (by default) quantisation.

    quantize: None reloads as saved (4-bit if it was trained 4-bit); False puts the adapter on the
    full-precision base. base_model_name_or_path overrides the base recorded in adapter_config.json
    (e.g. a local copy). dtype, dequantize: as for `load_base_model` (e.g. dtype=torch.float32 for an
    fp32-compute reference on a GPU). Returns a `peft.PeftModel` in eval mode unless is_trainable.
    """
    from peft import PeftModel

    if quantize is not None:
        check_bool(quantize, "quantize")
    check_bool(is_trainable, "is_trainable")
    check_bool(dequantize, "dequantize")
    meta = read_task_metadata(directory)
    base_id = base_model_name_or_path or meta.get("base_model_name_or_path")
    if not base_id:
        raise ValueError(f"{directory} records no base model; pass base_model_name_or_path=.")
    q = meta.get("quantized", False) if quantize is None else quantize
    base = load_base_model(
        base_id,
        meta["task_kind"],
        meta.get("num_labels"),
        quantize=q,
        id2label=meta.get("id2label"),
        device=device,
        dtype=dtype,
        dequantize=dequantize and q,
    )
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
    return model if is_trainable else model.eval()
