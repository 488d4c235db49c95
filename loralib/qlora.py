"""The article's closing recommendation done completely: PEFT LoRA on a 4-bit (QLoRA) or full-precision RoBERTa.

Covers: `build_peft_model` (RoBERTa for classification / regression / question answering, optionally loaded
in 4-bit nf4 with double quantisation through `BitsAndBytesConfig`, wrapped with the article's
`peft.LoraConfig`; the benchmark pipeline `loralib.training` calls it for its "peft" and "qlora" backends),
`make_optimizer` (bitsandbytes' 8-bit AdamW for quantised models, torch AdamW otherwise),
`quantized_linears` (what got quantised, to check it), `save_peft_model` / `load_peft_model` (PEFT's
adapter format plus a small `loralib_task.json` so a reload needs no `num_labels`), `merge_adapter` (merge
onto the 4-bit, the full-precision or the nf4-dequantised base), `merge_rounding` (how much of the update
a merge into 4-bit keeps), `output_difference` (compare two models' outputs) and
`compare_training_memory` / `memory_table` / `plot_memory` (full FT vs LoRA vs QLoRA, measured with
`loralib.profiling`). Not here: the training loop (`loralib.training`, HF Trainer), timing and memory helpers
(`loralib.profiling`), converting loralib adapters to and from PEFT's format (`loralib.peft_interop`).

Precision: 4-bit weights are stored as packed uint8 (two nf4 codes per byte) plus per-block scales; a
forward pass dequantises them to the compute dtype, bf16 on CUDA and fp32 on CPU (bf16 matmuls on a CPU
without bf16 units are far slower: about 40x on the 2-core machine this was developed on). The task heads (`classifier`, `qa_outputs`) are never
quantised: quantising a freshly initialised head that is also fully trained breaks training.

Needs the optional dependencies `peft` and `bitsandbytes` (bitsandbytes 0.50 runs nf4 and 8-bit AdamW on
CPU as well as CUDA; older releases may need CUDA). Both are imported lazily, so `import loralib` works without them.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
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
from loralib.utils import atomic_directory

# The article's PEFT recipe: all attention and feed-forward linears, plus norms and heads trained in full.
ARTICLE_TARGETS: tuple[str, ...] = ("query", "key", "value", "intermediate.dense", "output.dense")
ARTICLE_MODULES_TO_SAVE: tuple[str, ...] = ("LayerNorm", "classifier", "qa_outputs")
# Never quantised: they start random and train in full, so 4-bit rounding would cripple them.
HEAD_MODULES: tuple[str, ...] = ("classifier", "qa_outputs")
TASK_KINDS: tuple[str, ...] = ("classification", "regression", "question_answering")
TASK_FILE = "loralib_task.json"
MERGE_BASES: tuple[str, ...] = ("4bit", "full", "dequantized")


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

    dev = torch.device(device) if device is not None else _default_device()
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(dev) else torch.float16


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    dev = torch.device(device) if device is not None else _default_device()
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
        model = model.dequantize(dtype=torch.float32)
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
                "layout (lossy); build or reload the model with loralib.qlora (load_base_model, "
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
):
    """The article's PEFT model: a task model (4-bit nf4 if `quantize`) wrapped by `get_peft_model`.

    model_id: hub id or directory. task_kind: "classification" | "regression" | "question_answering".
    num_labels: classes for classification (regression: None or 1; QA: None or 2).
    quantize: load the base in 4-bit nf4 with double quantisation (QLoRA) and prepare it for k-bit
        training (norms in fp32, base frozen; no gradient checkpointing). Heads stay full precision.
    r, lora_alpha, lora_dropout, target_modules, modules_to_save, bias: `peft.LoraConfig` fields
        (scaling lora_alpha / r); the defaults are the article's. Entries of modules_to_save that name no
        module are ignored by PEFT (the article lists both heads for every task).
    id2label: class names, saved with the adapter. device: default CUDA when available, else CPU.
    dtype: compute dtype of the 4-bit layers (default `compute_dtype(device)`: bf16 on CUDA, fp32 on CPU).
    Seed before calling: the head and the LoRA A matrices are random. Returns a `peft.PeftModel` whose
    trainable parameters are exactly the LoRA matrices, modules_to_save and the biases `bias` asks for.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_bool(quantize, "quantize")
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
    )
    try:
        return get_peft_model(base, config)
    except ValueError as e:
        names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)][:12]
        raise ValueError(f"{e}\nLinear modules of {model_id!r} include: {names}") from e


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, eight_bit: bool | None = None, **adam_kwargs: Any
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: bitsandbytes' AdamW8bit for quantised models, else torch's.

    eight_bit: None decides by `is_quantized(model)`. Biases and layer-norm weights get no weight decay
    (the Trainer's convention). adam_kwargs: betas, eps. AdamW8bit keeps its two moments in 8 bits
    (blockwise-quantised) for tensors of at least 4096 elements and in fp32 for smaller ones.
    """
    check_number(lr, "lr", positive=True, hint="A learning rate such as 2e-4.")
    check_number(weight_decay, "weight_decay", minimum=0.0)
    if eight_bit is not None:
        check_bool(eight_bit, "eight_bit")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "layernorm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters; build it with build_peft_model() first.")
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    if eight_bit is None:
        eight_bit = is_quantized(model)
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, **adam_kwargs)
    return torch.optim.AdamW(groups, lr=lr, **adam_kwargs)


# ---------------------------------------------------------------- save / reload


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
    file and needs no argument. The directory is written as one atomic unit (`loralib.utils.atomic_directory`).
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
            f"{path} is missing: {directory} is {what}. Save with loralib.qlora.save_peft_model(), or load "
            "it with AutoPeftModelForSequenceClassification.from_pretrained(directory, num_labels=N)."
        )
    meta = read_json(path, "loralib's task file (save_peft_model writes it)")
    if not isinstance(meta, dict) or "task_kind" not in meta:
        raise ValueError(
            f"{path} lacks 'task_kind'; re-save the adapter with loralib.qlora.save_peft_model()."
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


def merge_adapter(
    directory: str | os.PathLike,
    onto: str = "dequantized",
    device: str | torch.device | None = None,
    base_model_name_or_path: str | None = None,
):
    """Load the adapter saved in `directory` onto a base and merge it: a plain transformers model, no PEFT.

    onto:
      "4bit": the 4-bit base; W_nf4 + s B A is re-quantised to nf4, so a small update mostly rounds away.
      "full": the original full-precision base; W + s B A is exact, but the adapter was trained against
          W_nf4, so this model differs from the trained one by the quantisation error of W.
      "dequantized": the 4-bit base dequantised to fp32 (W_nf4 exactly) + s B A: the trained function,
          merged, in full precision. Ship this (cast to bf16 if you like) or the unmerged adapter.
    For an adapter trained without quantisation "full" and "dequantized" are the same model.
    """
    if onto not in MERGE_BASES:
        raise ValueError(f"onto must be one of {MERGE_BASES}, got {onto!r}.")
    quantized = read_task_metadata(directory).get("quantized", False)
    model = load_peft_model(
        directory,
        quantize=onto == "4bit" or (onto == "dequantized" and quantized),
        dequantize=onto == "dequantized",
        device=device,
        base_model_name_or_path=base_model_name_or_path,
    )
    with warnings.catch_warnings():
        # PEFT warns that merging into 4-bit rounds; that rounding is what onto="4bit" is here to show.
        warnings.filterwarnings("ignore", message=".*4-bit linear may get different generations.*")
        merged = model.merge_and_unload()
    pin_cpu_4bit_path(merged)  # onto="4bit" re-quantises: the new Linear4bit layers get the same path
    return merged.eval()


def _rounding_of_layer(module, adapter: str, bf) -> tuple[float, float, float]:
    w = module.base_layer.weight
    qs = w.quant_state
    W = bf.dequantize_4bit(w.data, qs).float()
    D = module.get_delta_weight(adapter).float()
    M = W + D
    packed, state = bf.quantize_4bit(
        M.to(qs.dtype).contiguous(),
        blocksize=qs.blocksize,
        compress_statistics=qs.nested,
        quant_type=qs.quant_type,
    )
    Q = bf.dequantize_4bit(packed, state).float()
    dd = (D * D).sum().clamp_min(1e-30)
    # nf4 has 16 levels over [-absmax, absmax] per block: a mean step of 2 * absmax / 15.
    step = (W.reshape(-1, qs.blocksize).abs().amax(1) * 2 / 15).mean()
    return (
        float(((Q - W) * D).sum() / dd),
        float((Q - M).norm() / dd.sqrt()),
        float(D.pow(2).mean().sqrt() / step),
    )


def merge_rounding(model) -> dict[str, float]:
    """How much of the LoRA update survives a merge into the 4-bit weights, over all adapted 4-bit layers.

    For each layer: W = dequantised nf4 weight, D = s B A (the update), Q = nf4(W + D) dequantised,
    which is what `merge_and_unload` stores. Returns the medians over layers of
    "kept": <Q - W, D> / <D, D> (1 = the update is fully kept, 0 = rounded away) and
    "error": ||Q - (W + D)|| / ||D|| (rounding error relative to the update's size), plus
    "update_vs_step": rms(D) / mean nf4 step, the update's size in quantisation steps.
    """
    import statistics

    import bitsandbytes.functional as bf

    rows = []
    with torch.no_grad():
        for _, module in model.named_modules():
            base = getattr(module, "base_layer", None)
            if base is None or type(getattr(base, "weight", None)).__name__ != "Params4bit":
                continue
            rows += [_rounding_of_layer(module, a, bf) for a in module.active_adapters]
    if not rows:
        raise ValueError("the model has no LoRA layers on 4-bit weights; build it with quantize=True.")
    kept, error, ratio = zip(*rows)
    return {
        "layers": len(rows),
        "kept": statistics.median(kept),
        "error": statistics.median(error),
        "update_vs_step": statistics.median(ratio),
    }


# ---------------------------------------------------------------- comparing outputs


def model_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction tensor for `batch` in eval mode, in fp32 on CPU: logits, or start and end
    logits stacked for question answering."""
    was_training = model.training
    model.eval()
    dev = next(p.device for p in model.parameters())
    try:
        with torch.no_grad():
            out = model(**{k: v.to(dev) for k, v in batch.items()})
    finally:
        model.train(was_training)
    if getattr(out, "logits", None) is not None:
        return out.logits.float().cpu()
    return torch.stack([out.start_logits, out.end_logits]).float().cpu()


def output_difference(a: nn.Module, b: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max and mean absolute difference of two models' outputs on `batch`, relative to the output scale,
    and how often their argmax predictions agree (classification and QA)."""
    ya, yb = model_outputs(a, batch), model_outputs(b, batch)
    if ya.shape != yb.shape:
        raise ValueError(f"the models' outputs differ in shape: {tuple(ya.shape)} vs {tuple(yb.shape)}.")
    diff = (ya - yb).abs()
    scale = ya.abs().mean().clamp_min(1e-12)
    out = {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_rel": float(diff.mean() / scale),
    }
    if ya.shape[-1] > 1:
        out["argmax_agreement"] = float((ya.argmax(-1) == yb.argmax(-1)).float().mean())
    return out


# ---------------------------------------------------------------- memory: full FT vs LoRA vs QLoRA

MEMORY_CASES: dict[str, str] = {
    "full_ft": "full fine-tuning",
    "loralib": "LoRA (loralib)",
    "peft": "LoRA (PEFT)",
    "qlora": "QLoRA (PEFT, nf4 + AdamW8bit)",
}


def quant_state_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes' per-block scales (absmax, nested scales, code book) of the 4-bit weights.

    They live in `weight.quant_state`, outside parameters and buffers, so a parameter count misses them.
    """
    seen: dict[int, int] = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        parts = [state.absmax, state.code]
        if getattr(state, "state2", None) is not None:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        for t in parts:
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def logical_parameter_count(model: nn.Module) -> int:
    """Parameters counted as weights, not storage: a packed 4-bit tensor holds two weights per uint8."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None and hasattr(state, "shape") else p.numel()
    return total


def qlora_step_builder(
    config,
    directory: str | os.PathLike,
    r: int = 8,
    alpha: float = 8,
    targets: Sequence[str] = ARTICLE_TARGETS,
    num_labels: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """A builder for `loralib.profiling.measure_train_steps`: the QLoRA twin of `roberta_step_builders`.

    The same seed gives the same random RoBERTa as profiling's builders; it is saved to `directory`
    (from_pretrained is what quantises) and loaded in 4-bit nf4 with PEFT LoRA on `targets`, dropout 0
    and the head trained, exactly the recipe of profiling's "peft" case; the 4-bit layers compute in fp32
    like the other cases, so the comparison is about storage, not matmul precision.
    """
    from transformers import RobertaForSequenceClassification

    directory = Path(directory)

    def build() -> nn.Module:
        if not (directory / "config.json").exists():
            torch.manual_seed(seed)
            cfg = config.__class__.from_dict(config.to_dict())
            cfg.num_labels = num_labels
            RobertaForSequenceClassification(cfg).save_pretrained(str(directory))
        model = build_peft_model(
            str(directory),
            "classification",
            num_labels,
            quantize=True,
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=None,
            device=device,
            dtype=torch.float32,  # the other cases compute in fp32 too: compare storage, not precision
        )
        return model.train()

    return build


def compare_training_memory(
    config=None,
    batch_size: int = 4,
    seq_len: int = 64,
    r: int = 8,
    alpha: float = 8,
    targets: Sequence[str] = ARTICLE_TARGETS,
    repeats: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Memory and trainable parameters of one training step: full FT, LoRA (loralib), LoRA (PEFT), QLoRA.

    Uses the project's benchmark code (`loralib.profiling.measure_train_steps`) on a randomly
    initialised RoBERTa (`config`, default roberta-base sized) so it runs offline. Every case computes in
    fp32 (QLoRA dequantises its 4-bit weights to fp32). Full FT and the
    LoRA cases use torch AdamW; QLoRA uses bitsandbytes' AdamW8bit (measured in a second call, as
    the optimizer differs). Each case's `StepStats` has state_bytes (parameters, buffers, optimizer
    state and, for QLoRA, the quantisation scales, counted exactly), peak_extra_bytes (what one step
    allocates on top, from torch's allocator: torch.profiler on CPU, max_memory_allocated on CUDA)
    and peak_bytes (their sum). Returns {"cases": {name: StepStats}, "config": {...}}.
    """
    from loralib import profiling

    dev = torch.device(device) if device is not None else _default_device()
    config = profiling.roberta_config() if config is None else config
    batch = profiling.random_batch(config, batch_size=batch_size, seq_len=seq_len, seed=seed, device=dev)
    builders = profiling.roberta_step_builders(
        config, r=r, alpha=alpha, targets=tuple(targets), seed=seed, device=dev
    )
    cases = profiling.measure_train_steps(builders, batch, repeats=repeats, warmup=0, device=dev)
    with tempfile.TemporaryDirectory(prefix="loralib-qlora-") as tmp:
        build = qlora_step_builder(config, tmp, r=r, alpha=alpha, targets=targets, seed=seed, device=dev)
        holder: dict[str, nn.Module] = {}

        def build_and_keep() -> nn.Module:
            holder["model"] = build()
            return holder["model"]

        import bitsandbytes as bnb

        q = profiling.measure_train_steps(
            {"qlora": build_and_keep},
            batch,
            repeats=repeats,
            warmup=0,
            device=dev,
            optimizer_factory=lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4, weight_decay=0.01),
        )["qlora"]
        extra = quant_state_bytes(holder["model"])
        q.total_params = logical_parameter_count(holder["model"])
        q.state_bytes += extra
        if q.peak_bytes is not None:
            q.peak_bytes += extra
        cases["qlora"] = q
    return {
        "cases": {k: cases[k] for k in MEMORY_CASES if k in cases},
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "r": r,
            "alpha": alpha,
            "targets": list(targets),
            "device": str(dev),
            "peak_extra_source": "cuda_max_memory_allocated"
            if dev.type == "cuda"
            else "torch_profiler_cpu_allocator",
        },
    }


def memory_table(result: dict[str, Any]) -> str:
    """`compare_training_memory`'s result as an aligned text table (MiB, trainable parameters)."""
    mib = 2**20
    rows = [f"{'case':<32} {'trainable':>12} {'total':>12} {'state MiB':>10} {'step MiB':>9} {'peak MiB':>9}"]
    for name, s in result["cases"].items():
        rows.append(
            f"{MEMORY_CASES[name]:<32} {s.trainable_params:>12,} {s.total_params:>12,} {s.state_bytes / mib:>10.1f} "
            f"{(s.peak_extra_bytes or 0) / mib:>9.1f} {(s.peak_bytes or s.state_bytes) / mib:>9.1f}"
        )
    return "\n".join(rows)


def plot_memory(result: dict[str, Any], path: str | os.PathLike | None = None):
    """Stacked bars (state vs. what a step adds) per case, trainable parameters on a log axis beside."""
    import matplotlib.pyplot as plt

    cases = result["cases"]
    labels = [MEMORY_CASES[k] for k in cases]
    state = [s.state_bytes / 2**20 for s in cases.values()]
    step = [(s.peak_extra_bytes or 0) / 2**20 for s in cases.values()]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(labels))
    ax.barh(y, state, color="#4c72b0", label="params + buffers + optimizer state")
    ax.barh(y, step, left=state, color="#dd8452", label="allocated during a step")
    for i, (a, b) in enumerate(zip(state, step)):
        ax.text(a + b, i, f" {a + b:,.0f}", va="center", fontsize=9)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    c = result["config"]
    ax.set_title(
        f"peak memory of one training step ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['device']})"
    )
    ax.legend(loc="lower right", fontsize=8)
    trainable = [s.trainable_params for s in cases.values()]
    ax2.barh(y, trainable, color="#55a868")
    ax2.set_xscale("log")
    ax2.set_xlim(1e4, max(trainable) * 30)  # log bars need a floor well below the smallest count
    for i, s in enumerate(cases.values()):
        ax2.text(
            s.trainable_params,
            i,
            f" {s.trainable_params:,} ({100 * s.trainable_params / s.total_params:.1f}%)",
            va="center",
            fontsize=9,
        )
    ax2.set_yticks(list(y), [])
    ax2.invert_yaxis()
    ax2.set_xlabel("trainable parameters (log)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
