"""The four model backends of the benchmark: build, save and reload one per backend.

"loralib" (a stock transformers model with `LoraLinear` injected), "article" (the seed article's
`LoraWrapperRoberta`), "peft" and "qlora" (`loralib.peft_backend`). Covers: `build_model` (LoRA in place,
only the recipe's tensors trainable, the same trainable set for every backend), saving a run's adapter in
its backend's format, and `load_trained_model` (a finished run's model back from its directory). Not here:
the Trainer (`loralib.benchmark.trainer`), the adapter formats themselves (`loralib.adapters`,
`loralib.peft_backend`, `loralib.article`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from loralib.benchmark.config import TrainConfig, config_from_results, is_qa, resolve_model_id, task_spec
from loralib.benchmark.results import ADAPTER_DIR, read_results


def _head_name(task: str) -> str:
    return "qa_outputs" if is_qa(task) else "classifier"


def _label_maps(spec) -> tuple[dict[int, str], dict[str, int]]:
    names = list(getattr(spec, "label_names", None) or [])
    if spec.is_regression or not names:
        return {}, {}
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def load_error(model_id: str, exc: Exception) -> RuntimeError:
    """A model that cannot be loaded, with the offline ways out named."""
    return RuntimeError(
        f"could not load model {model_id!r}: {type(exc).__name__}: {exc}\n"
        "Offline? Use --profile smoke (the tiny RoBERTa built locally) or --model-id PATH to a local copy."
    )


def build_model(cfg: TrainConfig, model_id: str | None = None) -> torch.nn.Module:
    """The model of `cfg.backend` for `cfg.task`, with LoRA in place and only the recipe's tensors trainable."""
    spec = task_spec(cfg.task)
    model_id = model_id or resolve_model_id(cfg)
    qa = is_qa(cfg.task)
    alpha = cfg.lora.settings_for("").lora_alpha  # lora_alpha=None (the recipe) resolves to r here, once
    from loralib.utils import set_seed

    set_seed(cfg.seed)  # the head's and A's random init are part of the run
    if cfg.backend == "loralib":
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        from loralib.injection import inject_lora, mark_only_lora_as_trainable

        try:
            if qa:
                model = AutoModelForQuestionAnswering.from_pretrained(model_id)
            else:
                id2label, label2id = _label_maps(spec)
                kwargs = dict(id2label=id2label, label2id=label2id) if id2label else {}
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_id,
                    num_labels=spec.num_labels,
                    problem_type="regression" if spec.is_regression else "single_label_classification",
                    **kwargs,
                )
        except OSError as exc:
            raise load_error(model_id, exc) from exc
        inject_lora(model, cfg.lora, init_lora_weights=True if cfg.formulation == "scaled" else "article")
        mark_only_lora_as_trainable(
            model,
            bias="all" if cfg.train_biases else "none",
            train_layer_norms=cfg.train_layer_norms,
            modules_to_save=[_head_name(cfg.task)],
        )
        return model
    if cfg.backend == "article":
        from loralib.article.wrapper import LoraWrapperRoberta

        try:
            return LoraWrapperRoberta(
                task_type=("squad_v1" if cfg.task == "squad" else cfg.task) if qa else "glue",
                num_classes=None if qa else spec.num_labels,
                model_id=model_id,
                r=cfg.r,
                formulation=cfg.formulation,
                lora_alpha=None if cfg.formulation == "article" else alpha,  # the article's form has no scale
                lora_dropout=cfg.lora_dropout,
                train_biases=cfg.train_biases,
                train_layer_norms=cfg.train_layer_norms,
                null_score_diff_threshold=cfg.null_score_diff_threshold,
            )
        except OSError as exc:
            raise load_error(model_id, exc) from exc
    from loralib.peft_backend import build_peft_model

    # The same trainable set as the loralib backend (targets, biases, norms, head), so backends compare.
    kind = "question_answering" if qa else ("regression" if spec.is_regression else "classification")
    id2label, _ = _label_maps(spec)
    to_save = [_head_name(cfg.task)] + (["LayerNorm"] if cfg.train_layer_norms else [])
    try:
        return build_peft_model(
            model_id,
            task_kind=kind,
            num_labels=None if qa else spec.num_labels,
            quantize=cfg.backend == "qlora",
            r=cfg.r,
            lora_alpha=alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            modules_to_save=to_save,
            bias="all" if cfg.train_biases else "none",
            id2label=id2label or None,
            use_rslora=cfg.use_rslora,
        )
    except OSError as exc:
        raise load_error(model_id, exc) from exc


def save_adapter(cfg: TrainConfig, model, spec, model_id: str, directory: Path) -> dict[str, Any]:
    """Save the trained adapter of `model` in its backend's format into `directory`; return its results entry."""
    id2label, _ = _label_maps(spec)
    meta = dict(
        task=cfg.task,
        num_labels=spec.num_labels,
        id2label={str(k): v for k, v in id2label.items()},
        base_model=model_id,
        backend=cfg.backend,
        formulation=cfg.formulation,
    )
    from loralib.adapters import adapter_size_bytes

    if cfg.backend == "loralib":
        from loralib.adapters import save_lora

        save_lora(model, directory, **meta)
        return {"path": ADAPTER_DIR, "format": "loralib", "size_bytes": adapter_size_bytes(directory)}
    if cfg.backend == "article":
        own = model.lora_metadata()  # the wrapper records these itself; metadata may not repeat them
        model.save_lora(directory, **{k: v for k, v in meta.items() if k not in own})
        return {"path": ADAPTER_DIR, "format": "article", "size_bytes": adapter_size_bytes(directory)}
    from loralib.peft_backend import save_peft_model

    save_peft_model(
        model, directory, **{k: v for k, v in meta.items() if k in ("task", "backend", "formulation")}
    )
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return {"path": ADAPTER_DIR, "format": "peft", "size_bytes": size}


def load_trained_model(
    task_dir: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, results) rebuilt from a finished run's directory: base model + saved adapter.

    Works for every backend (loralib: stock model + `load_lora`; article: `LoraWrapperRoberta.from_lora`;
    peft / qlora: `loralib.peft_backend.load_peft_model`); the model is returned in eval mode on `device`
    (default: CUDA when available, as training was), so inference does not fall back to the CPU.
    """
    from transformers import AutoTokenizer

    from loralib.utils import default_device

    dev = torch.device(device) if device is not None else default_device()
    task_dir = Path(task_dir)
    results = read_results(task_dir)
    cfg = config_from_results(results)
    adapter = task_dir / results["adapter"]["path"]
    model_id = resolve_model_id(cfg)
    fmt = results["adapter"]["format"]
    if fmt == "peft":
        from loralib.peft_backend import load_peft_model

        model = load_peft_model(adapter, device=dev, base_model_name_or_path=model_id)
    elif fmt == "article":
        from loralib.article.wrapper import LoraWrapperRoberta

        model = LoraWrapperRoberta.from_lora(adapter, model_id=model_id).to(dev)
    else:
        from loralib.adapters import load_lora

        model = build_model(cfg, model_id)
        load_lora(model, adapter)
        model.to(dev)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_id), results
