"""Save and load what LoRA trained: the A/B matrices plus any other trained weights, nothing frozen.

Format: a directory with `adapter.safetensors` (tensors; the config is also embedded in the file's
metadata, so the weights file alone is self-describing) and `lora_config.json` beside it for humans
and tools. Both are written to temporary files and renamed, so a crash never leaves a half-written
adapter. Loading injects LoRA if the model has none yet, then checks every name and shape.

Not here: PEFT's adapter format (`loralib.peft_interop`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from loralib.injection import inject_lora, lora_layers
from loralib.utils import atomic_write

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "lora_config.json"
FORMAT_VERSION = 1
ADAPTER_FORMAT = "loralib-adapter"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA matrix plus every other parameter that requires grad (biases, norms, head...)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.requires_grad or leaf in ("lora_A", "lora_B"):
            out[name] = p.detach()
    return out


def lora_config(model: nn.Module, **metadata: Any) -> dict[str, Any]:
    """The JSON-able description of the model's adapters (per-layer r/alpha when they differ)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, target_modules) first.")
    ranks = {layer.r for _, layer in layers}
    alphas = {layer.alpha for _, layer in layers}
    dropouts = {layer.lora_dropout_p for _, layer in layers}
    inits = {layer.init for _, layer in layers}
    cfg: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "r": ranks.pop() if len(ranks) == 1 else None,
        "alpha": alphas.pop() if len(alphas) == 1 else None,
        "dropout": dropouts.pop() if len(dropouts) == 1 else None,
        "init": inits.pop() if len(inits) == 1 else None,
        "target_modules": [n for n, _ in layers],
        "per_layer": {n: {"r": layer.r, "alpha": layer.alpha} for n, layer in layers},
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    cfg.update(metadata)
    return cfg


def save_lora(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write the adapter of `model` to directory `path`; extra keyword metadata (task, num_labels,
    base_model...) goes into the config. Returns the weights file's path."""
    cfg = lora_config(model, **metadata)
    text = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"loralib_config": text}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (config, tensors) from an adapter directory or its .safetensors file."""
    p = Path(path)
    weights = p / WEIGHTS_NAME if p.is_dir() else p
    if not weights.exists():
        raise FileNotFoundError(
            f"no adapter at {weights}; save_lora(model, dir) writes {WEIGHTS_NAME} and {CONFIG_NAME} into dir."
        )
    try:
        # One pass over the file for both the tensors and the embedded config.
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({e}); it is corrupt or truncated: re-save it."
        ) from e
    if "loralib_config" in meta:
        text, source = meta["loralib_config"], f"the metadata of {weights}"
    elif (weights.parent / CONFIG_NAME).exists():
        text, source = (weights.parent / CONFIG_NAME).read_text(), str(weights.parent / CONFIG_NAME)
    else:
        raise ValueError(f"{weights} has no loralib config; was it written by save_lora()?")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"the adapter config in {source} is not valid JSON ({e}); re-save the adapter."
        ) from e
    if not isinstance(cfg, dict):
        raise ValueError(f"the adapter config in {source} is not a JSON object; re-save the adapter.")
    return cfg, tensors


def load_lora(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """Load an adapter saved by `save_lora` into `model` and return its config.

    If the model has no LoRA layers, they are injected first as the config describes. Every tensor
    name must exist in the model with the same shape; with strict=True every LoRA matrix of the
    model must be in the file. Mismatches raise ValueError naming the keys and the likely cause.
    """
    cfg, tensors = read_adapter(path)
    if cfg.get("format") != ADAPTER_FORMAT or "target_modules" not in cfg:
        raise ValueError(
            f"{path} holds a {cfg.get('format')!r} adapter, not a {ADAPTER_FORMAT!r} one written by save_lora(); "
            "LoraWrapperRoberta adapters load with LoraWrapperRoberta.from_lora, PEFT ones with "
            "loralib.peft_interop.from_peft."
        )
    originals = dict(model.named_modules())
    injected: list[str] = []
    try:
        if not any(True for _ in lora_layers(model)):
            _inject_from_config(model, cfg, injected)
        _check_fits(model, cfg, tensors, strict)
    except BaseException:
        # A load that fails must leave the model as it was, not half-adapted: put the original
        # Linear modules (their own Parameter objects, requires_grad included) back.
        for name in injected:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, originals[name])
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(dtype=params[k].dtype, device=params[k].device))
    return cfg


def _inject_from_config(model: nn.Module, cfg: dict[str, Any], injected: list[str]) -> None:
    """Inject LoRA as the adapter's config describes, appending each adapted name to `injected`."""
    per_layer = cfg.get("per_layer") or {}
    for name in cfg["target_modules"]:
        spec = per_layer.get(name, {})
        injected += inject_lora(
            model,
            [name],
            r=int(spec.get("r", cfg["r"])),
            alpha=spec.get("alpha", cfg["alpha"]),
            dropout=cfg.get("dropout") or 0.0,
            init=cfg.get("init") or "kaiming",
        )


def _check_fits(
    model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], strict: bool
) -> None:
    params = dict(model.named_parameters())
    missing_in_model = [k for k in tensors if k not in params]
    if missing_in_model:
        raise ValueError(
            f"the adapter has {len(missing_in_model)} tensors the model lacks, e.g. {missing_in_model[:5]}; "
            f"it was made for base model {cfg.get('base_model')!r} with targets {cfg.get('target_modules')[:4]}... "
            "Load it into the same architecture (and the same task head)."
        )
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in tensors.items()
        if tuple(v.shape) != tuple(params[k].shape)
    ]
    if bad:
        raise ValueError(
            "adapter shapes don't fit the model (different rank r, hidden size or number of labels?): "
            + "; ".join(bad[:5])
            + f". The adapter was saved with r={cfg.get('r')}."
        )
    if strict:
        absent = [n for n in params if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") and n not in tensors]
        if absent:
            raise ValueError(
                f"the model has LoRA matrices the adapter does not contain, e.g. {absent[:5]}; the adapter targets "
                f"{cfg.get('target_modules')[:4]}... Inject the same targets, or pass strict=False."
            )
    # Same shapes but another alpha would load silently and compute a differently scaled update.
    per_layer = cfg.get("per_layer") or {}
    wrong_alpha = [
        f"{n}: adapter alpha={per_layer[n]['alpha']:g}, model alpha={layer.alpha:g}"
        for n, layer in lora_layers(model)
        if n in per_layer and float(per_layer[n]["alpha"]) != layer.alpha
    ]
    if wrong_alpha:
        raise ValueError(
            "the model's LoRA scaling differs from the adapter's: "
            + "; ".join(wrong_alpha[:5])
            + ". Inject with the adapter's alpha, or load into a model without LoRA so load_lora injects it."
        )
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(
            f"LoRA layers {merged[:3]} are merged; call unmerge_lora(model) before loading an adapter."
        )


def adapter_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an adapter directory (weights plus config)."""
    p = Path(path)
    files = [p / WEIGHTS_NAME, p / CONFIG_NAME] if p.is_dir() else [p]
    return sum(f.stat().st_size for f in files if f.exists())
