"""Save and load what LoRA trained: the A/B matrices plus any other trained weights, nothing frozen.

Format: a directory with `adapter.safetensors` (tensors; the config is also embedded in the file's
metadata, so the weights file alone is self-describing) and `lora_config.json` beside it for humans
and tools. Both are written into a staging directory that then replaces the adapter directory as a
whole, so a crash never leaves a half-written adapter or new weights beside an old config. A config
from a newer loralib (format_version) is refused with the advice to upgrade. Loading injects LoRA if
the model has none yet, then checks every name and shape; a failed load leaves the model as it was.

Covers: `save_lora` / `load_lora` (with `adapter_name=`: one named adapter of a model that holds several,
`loralib.named`), `save_adapters` / `load_adapters` (every named adapter, one sub-directory each and an
`adapters.json` index, atomic as a whole), `adapter_state_dict` (what an adapter file holds) and Microsoft
loralib's `lora_state_dict(model, bias=...)`. Not here: PEFT's adapter format (`loralib.peft_interop`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from loralib.checks import check_bool, check_choice, check_module
from loralib.config import BIAS_CHOICES, LoraSettings
from loralib.files import atomic_directory, read_files, safetensors_from_bytes
from loralib.injection import config_of, inject_settings, lora_layers, unchanged_on_failure
from loralib.layers import LORA_TENSORS, LoraLayer
from loralib.named import (
    active_adapter,
    active_parameters,
    adapter_names,
    carried_names,
    head_modules,
    loading_into,
    set_adapter,
    using_adapter,
)

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "lora_config.json"
# 2: PEFT's names lora_alpha / lora_dropout (1 said alpha / dropout; still read). 3: a layer may scale by
# lora_alpha / sqrt(r) (per_layer "use_rslora": true); written only then, so older readers refuse exactly
# the adapters they would misread.
FORMAT_VERSION = 3
PLAIN_FORMAT_VERSION = 2
ADAPTER_FORMAT = "loralib-adapter"
PEFT_CONFIG = "adapter_config.json"  # PEFT's files, recognised to point the caller at from_peft
PEFT_FILES = (PEFT_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


# Keys save_lora computes from the model; metadata may not replace them (base_model it may: a hub id
# or directory is often known better by the caller than by model.config).
RESERVED_KEYS = (
    "format", "format_version", "r", "lora_alpha", "lora_dropout", "init", "target_modules", "per_layer",
    "use_rslora", "lora_config",
    "alpha", "dropout",  # version 1's names: still refused, so an old reader is never misled
)  # fmt: skip
# What a config must hold, and the JSON types each key may have (None where it varies per layer).
_SCHEMA: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "target_modules": (list,),
    "r": (int, type(None)),
    "lora_alpha": (int, float, type(None)),
    "per_layer": (dict,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {"lora_dropout": (int, float, type(None)), "init": (str, type(None))}
_V1_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `save_lora` writes: every LoRA matrix plus every other parameter that requires grad (biases,
    norms, head...).

    Values are the unmerged ones: a merged layer whose own weight also trains (LoRA inside a module of
    `modules_to_save`) contributes its weight without the update, so a reload never applies it twice.
    """
    unmerged = {f"{n}.weight": layer for n, layer in lora_layers(model) if layer.merged}
    carried = carried_names(model)  # a named adapter's own head and values, trained or not
    out: dict[str, torch.Tensor] = {}
    for name, p in active_parameters(model).items():
        leaf = name.rsplit(".", 1)[-1]
        if p.requires_grad or leaf in LORA_TENSORS or name in carried:
            value = (unmerged[name].unmerged_weight() if name in unmerged else p).detach()
            # a carried value lives in a shared parameter that the next set_adapter overwrites: copy it
            out[name] = value.clone() if name in carried else value
    return out


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """Microsoft loralib's `lora_state_dict`, with its meaning: the LoRA tensors of `model.state_dict()`;
    bias="all" adds every entry whose name contains "bias", "lora_only" the bias of each LoRA layer. The
    keys and values are the state dict's (a merged layer's weight is not included, so merging does not
    matter). For everything a trained adapter needs (heads, norms), use `save_lora` / `adapter_state_dict`.
    """
    check_module(model)
    check_choice(bias, "bias", BIAS_CHOICES)
    state = model.state_dict()
    layers = [f"{n}." if n else "" for n, _ in lora_layers(model)]  # "" when the model is the layer
    lora_keys = {p + t for p in layers for t in LORA_TENSORS}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():  # Microsoft's order: a LoRA tensor, then its layer's bias
        if key in lora_keys or (bias == "all" and "bias" in key):
            out[key] = value
            owner = key.rpartition(".")[0]
            bias_key = f"{owner}.bias" if owner else "bias"
            if key in lora_keys and bias == "lora_only" and bias_key in state:
                out[bias_key] = state[bias_key]
    return out


def check_metadata(metadata: dict[str, Any], reserved: tuple[str, ...], writer: str) -> None:
    """Refuse metadata keys that would overwrite what `writer` computes, or that are not strings."""
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise TypeError(f"metadata keys must be strings, got {bad[:3]!r}.")
    for key, value in metadata.items():  # refused here, not stringified into the file
        try:
            json.dumps(value, default=lambda v: os.fspath(v) if isinstance(v, os.PathLike) else _not_json(v))
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"metadata {key!r} is not JSON: {e}; pass str, numbers, bools, None, lists or dicts of them."
            ) from None
    clash = sorted(set(metadata) & set(reserved))
    if clash:
        raise ValueError(
            f"metadata keys {clash} are reserved: {writer} computes them from the model. Rename them "
            f"(e.g. {'user_' + clash[0]!r}); reserved keys are {list(reserved)}."
        )


def _not_json(value: Any):
    raise TypeError(f"a {type(value).__name__} ({value!r:.60})")


def lora_config(model: nn.Module, **metadata: Any) -> dict[str, Any]:
    """The JSON-able description of the model's adapters (per-layer r/alpha when they differ)."""
    check_module(model)
    check_metadata(metadata, RESERVED_KEYS, "save_lora")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, target_modules) first.")
    ranks = {layer.r for _, layer in layers}
    alphas = {layer.lora_alpha for _, layer in layers}
    dropouts = {layer.lora_dropout_p for _, layer in layers}
    inits = {layer.init for _, layer in layers}
    rslora = any(layer.use_rslora for _, layer in layers)
    cfg: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION if rslora else PLAIN_FORMAT_VERSION,
        "r": next(iter(ranks)) if len(ranks) == 1 else None,
        "lora_alpha": next(iter(alphas)) if len(alphas) == 1 else None,
        "lora_dropout": next(iter(dropouts)) if len(dropouts) == 1 else None,
        "init": next(iter(inits)) if len(inits) == 1 else None,
        "target_modules": [n for n, _ in layers],
        "per_layer": {
            n: {
                "r": layer.r,
                "lora_alpha": layer.lora_alpha,
                **({"use_rslora": True} if layer.use_rslora else {}),
                **({"lora_bias": True} if layer.lora_B_bias is not None else {}),
                **({"use_dora": True} if layer.use_dora else {}),
                # Written per layer only where layers differ (the top-level value is then None).
                **({"lora_dropout": layer.lora_dropout_p} if len(dropouts) > 1 else {}),
                **({"init": layer.init} if len(inits) > 1 else {}),
            }
            for n, layer in layers
        },
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        # The same adapters as one LoraConfig in PEFT's fields (per_layer stays what loading reads).
        "lora_config": config_of(dict(layers)).to_dict(),
    }
    cfg.update(metadata)
    return cfg


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `tensors` (with `config` embedded in the file's metadata) and the config beside them as
    one atomic directory: a crash never leaves new weights beside an old config. Returns the weights path."""
    directory = Path(path)
    with atomic_directory(directory) as stage:
        _write_into(stage, tensors, config)
    return directory / WEIGHTS_NAME


def _write_into(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"loralib_config": text})
    (folder / CONFIG_NAME).write_text(text + "\n")


def save_lora(
    model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None, **metadata: Any
) -> Path:
    """Write the adapter of `model` to directory `path`; extra keyword metadata (task, num_labels,
    base_model...) goes into the config. Returns the weights file's path.

    adapter_name: which named adapter (default: the active one); the file is the same format as a
    single-adapter model's, its head and carried values included (`loralib.named`).
    The directory is written as a whole (see `loralib.files.atomic_directory`); metadata keys that
    collide with the computed ones (RESERVED_KEYS) are refused before anything is written.
    """
    check_module(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), got {type(path).__name__}.")
    if adapter_name is not None:
        return write_adapter(path, *_named_adapter_files(model, adapter_name, metadata))
    return write_adapter(path, adapter_state_dict(model), lora_config(model, **metadata))


def _named_adapter_files(
    model: nn.Module, adapter_name: str, metadata: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of named adapter `adapter_name`, its name recorded in the config."""
    with using_adapter(model, adapter_name):
        return adapter_state_dict(model), lora_config(model, adapter_name=adapter_name, **metadata)


def save_adapters(model: nn.Module, directory: str | os.PathLike, **metadata: Any) -> Path:
    """Write every named adapter of `model` into `directory/<name>/` (each a `save_lora` directory), as one
    atomic directory; `load_adapters` reads them back. Returns the directory."""
    check_module(model)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}.")
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no LoRA adapters; call inject_lora or add_adapter first.")
    parts = {name: _named_adapter_files(model, name, metadata) for name in names}
    directory = Path(directory)
    index = {"format": "loralib-adapters", "adapters": names, "active": active_adapter(model)}
    with atomic_directory(directory) as stage:
        for name, (tensors, cfg) in parts.items():
            _write_into(stage / name, tensors, cfg)
        (stage / ADAPTERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return directory


ADAPTERS_INDEX = "adapters.json"  # save_adapters' list of names in order, and which was active


def load_adapters(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> list[str]:
    """Load every adapter `save_adapters` wrote into `directory` under its name, in the order it listed
    them; return the names. The adapter active before stays active; a model without LoRA ends with the
    one that was active when they were saved. A failure leaves the adapters loaded before it."""
    check_module(model)
    directory = Path(directory)
    index_file = directory / ADAPTERS_INDEX
    if not index_file.exists():
        raise FileNotFoundError(
            f"no {ADAPTERS_INDEX} in {directory}; save_adapters(model, directory) writes it."
        )
    index = json.loads(index_file.read_text())
    names = index.get("adapters")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{index_file} lists no adapters; re-save with save_adapters.")
    fresh = not any(isinstance(m, LoraLayer) for m in model.modules())
    for name in names:
        load_lora(model, directory / name, adapter_name=name, trainable=trainable)
    if fresh and index.get("active") in names:
        set_adapter(model, index["active"])
    return names


def _weights_path(path: str | os.PathLike) -> Path:
    """The adapter's .safetensors file for a directory, the weights file or the config file beside it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be an adapter directory or file path, got {type(path).__name__}.")
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if (
        p.is_dir() and (p / PEFT_CONFIG).exists() and not (p / WEIGHTS_NAME).exists()
    ) or p.name in PEFT_FILES:
        raise ValueError(
            f"{path} is a PEFT adapter ({PEFT_CONFIG}); load it with loralib.peft_interop.from_peft(model, "
            f"{str(folder)!r})."
        )
    if p.is_dir():
        weights = p / WEIGHTS_NAME
    elif p.name == CONFIG_NAME:
        weights = p.parent / WEIGHTS_NAME
    else:
        weights = p
    if not weights.exists():
        raise FileNotFoundError(
            f"no adapter at {weights}; save_lora(model, dir) writes {WEIGHTS_NAME} and {CONFIG_NAME} into dir, "
            "and load_lora takes that directory or either file."
        )
    return weights


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (config, tensors) from an adapter directory, its .safetensors file or its lora_config.json.

    A format_version 1 config comes back in today's names (lora_alpha, lora_dropout)."""
    weights = _weights_path(path)
    # Every file through one handle on the directory: a save running meanwhile swaps whole directories,
    # so this reads the old adapter or the new one, never one's config with the other's tensors.
    files = read_files(weights.parent, [weights.name, CONFIG_NAME, PEFT_CONFIG])
    if files[weights.name] is None:
        raise FileNotFoundError(f"no adapter at {weights} (it was removed while being read).")
    tensors, meta = safetensors_from_bytes(files[weights.name], weights)
    if "loralib_config" in meta:
        text, source = meta["loralib_config"], f"the metadata of {weights}"
    elif files[CONFIG_NAME] is not None:
        text, source = files[CONFIG_NAME].decode("utf-8", "replace"), str(weights.parent / CONFIG_NAME)
    elif files[PEFT_CONFIG] is not None:
        raise ValueError(
            f"{weights} is a PEFT adapter; load it with loralib.peft_interop.from_peft(model, {str(weights.parent)!r})."
        )
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
    return _upgrade(cfg), tensors


def check_format_version(cfg: dict[str, Any], newest: int, source: Any) -> None:
    """Refuse a config written by a newer loralib: its meaning may have changed."""
    version = cfg.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{source}: format_version must be an integer, got {version!r}; re-save the adapter."
        )
    if version > newest:
        raise ValueError(
            f"{source} was written by a newer loralib (format_version {version}; this one reads up to {newest}): "
            "upgrade loralib (pip install -U lora-from-scratch, or git pull) to load it."
        )


def _upgrade(cfg: dict[str, Any]) -> dict[str, Any]:
    """A format_version 1 config in today's names (alpha -> lora_alpha, dropout -> lora_dropout)."""
    if cfg.get("format") != ADAPTER_FORMAT or cfg.get("format_version") != 1:
        return cfg
    out = {_V1_NAMES.get(k, k): v for k, v in cfg.items()}
    per_layer = out.get("per_layer")
    if isinstance(per_layer, dict):
        out["per_layer"] = {
            n: {_V1_NAMES.get(k, k): v for k, v in spec.items()} if isinstance(spec, dict) else spec
            for n, spec in per_layer.items()
        }
    return out


def _check_config(cfg: dict[str, Any], source: Any) -> None:
    """Name the first key that is missing or of the wrong type, with the type it should have."""
    for key, types in {**_SCHEMA, **_OPTIONAL}.items():
        if key not in cfg and key in _OPTIONAL:
            continue
        if key not in cfg:
            raise ValueError(
                f"{source}: the adapter config lacks {key!r}; re-save the adapter with save_lora()."
            )
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(_TYPE_WORDS[t] for t in types)
            raise ValueError(
                f"{source}: config key {key!r} must be {want}, got {value!r}; re-save the adapter."
            )
    check_format_version(cfg, FORMAT_VERSION, source)
    if not all(isinstance(t, str) for t in cfg["target_modules"]):
        raise ValueError(
            f"{source}: config key 'target_modules' must be a list of strings; re-save the adapter."
        )
    for name in cfg["target_modules"]:
        spec = cfg["per_layer"].get(name, {})
        if isinstance(spec, dict) and not isinstance(spec.get("use_rslora", False), bool):
            raise ValueError(
                f"{source}: layer {name!r} has use_rslora={spec['use_rslora']!r}, expected true or false; "
                "re-save the adapter."
            )
        for key, types in (("r", (int,)), ("lora_alpha", (int, float))):
            value = spec.get(key, cfg[key]) if isinstance(spec, dict) else None
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(
                    f"{source}: layer {name!r} has no valid {key!r} (per_layer or the top-level value): got "
                    f"{value!r}, expected {_TYPE_WORDS[types[0]]}; re-save the adapter."
                )


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    trainable: bool = True,
    *,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Load an adapter saved by `save_lora` into `model` and return its config.

    path: the adapter directory, its adapter.safetensors or its lora_config.json.
    If the model has no LoRA layers, they are injected first as the config describes. Every tensor
    name must exist in the model with the same shape; with strict=True every LoRA matrix of the
    model must be in the file. Mismatches raise ValueError naming the keys and the likely cause, and
    leave the model exactly as it was. trainable: afterwards exactly the adapter's tensors are
    trainable and everything else is frozen (what was trained; saving again writes the same set);
    False leaves every requires_grad flag as it was.

    adapter_name: load it as this named adapter beside the model's others (`loralib.named`): new LoRA
    tensors in each layer it adapts, its own copy of each task head (of the file's shape: another
    num_labels is fine) and its own values of any other tensor it carries (biases, norms). The active
    adapter stays active (on a model without LoRA this one becomes the first, active adapter).
    """
    check_module(model)
    check_bool(strict, "strict")
    check_bool(trainable, "trainable")
    cfg, tensors = read_adapter(path)
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{path} holds a {cfg.get('format')!r} adapter, not a {ADAPTER_FORMAT!r} one written by save_lora(); "
            "LoraWrapperRoberta adapters load with LoraWrapperRoberta.from_lora, PEFT ones with "
            "loralib.peft_interop.from_peft."
        )
    _check_config(cfg, path)
    if adapter_name is not None:
        lora_keys = {f"{n}.{t}" for n in cfg["target_modules"] for t in LORA_TENSORS}
        others = {k: v for k, v in tensors.items() if k not in lora_keys}
        with loading_into(
            model, adapter_name, _settings_from_config(cfg), others, head_modules(model, others)
        ):
            return load_lora(model, path, strict, trainable)
    # A load that fails must leave the model as it was, not half-adapted.
    with unchanged_on_failure(model, params=tensors):
        if not any(True for _ in lora_layers(model)):
            _inject_from_config(model, cfg)
        _check_fits(model, cfg, tensors, strict)
        params = active_parameters(model)
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(dtype=params[k].dtype, device=params[k].device))
        if trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            for n, p in params.items():
                p.requires_grad_(n in tensors)
    return cfg


def _settings_from_config(cfg: dict[str, Any]) -> dict[str, LoraSettings]:
    """{module name: LoraSettings} of the layers an adapter's config describes."""
    per_layer = cfg.get("per_layer") or {}
    out = {}
    for name in cfg["target_modules"]:
        spec = per_layer.get(name, {})
        out[name] = LoraSettings(
            r=int(spec.get("r", cfg["r"])),
            lora_alpha=spec.get("lora_alpha", cfg["lora_alpha"]),
            lora_dropout=spec.get("lora_dropout", cfg.get("lora_dropout")) or 0.0,
            init=spec.get("init", cfg.get("init")) or "kaiming",
            use_rslora=bool(spec.get("use_rslora", False)),
            lora_bias=bool(spec.get("lora_bias", False)),
            use_dora=bool(spec.get("use_dora", False)),
        )
    return out


def _inject_from_config(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Inject LoRA into exactly the layers the adapter's config names (full names: no suffix matching)."""
    for name, settings in _settings_from_config(cfg).items():
        inject_settings(model, name, settings)


def tensor_mismatches(
    params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """(names in `tensors` that `params` lacks, "name: file (..) vs model (..)" for shapes that differ)."""
    unknown = [k for k in tensors if k not in params]
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in tensors.items()
        if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    return unknown, bad


def _check_fits(
    model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], strict: bool
) -> None:
    params = active_parameters(model)
    missing_in_model, bad = tensor_mismatches(params, tensors)
    if missing_in_model:
        raise ValueError(
            f"the adapter has {len(missing_in_model)} tensors the model lacks, e.g. {missing_in_model[:5]}; "
            f"it was made for base model {cfg.get('base_model')!r} with targets {cfg.get('target_modules')[:4]}... "
            "Load it into the same architecture (and the same task head)."
        )
    if bad:
        raise ValueError(
            "adapter shapes don't fit the model (different rank r, hidden size or number of labels?): "
            + "; ".join(bad[:5])
            + f". The adapter was saved with r={cfg.get('r')}."
        )
    if strict:
        absent = [n for n in params if n.rsplit(".", 1)[-1] in LORA_TENSORS and n not in tensors]
        if absent:
            raise ValueError(
                f"the model has LoRA matrices the adapter does not contain, e.g. {absent[:5]}; the adapter targets "
                f"{cfg.get('target_modules')[:4]}... Inject the same targets, or pass strict=False."
            )
    # Same shapes but another alpha would load silently and compute a differently scaled update.
    per_layer = cfg.get("per_layer") or {}

    def rule(rslora: bool) -> str:
        return " (use_rslora: / sqrt(r))" if rslora else ""

    wrong_alpha = [
        f"{n}: adapter lora_alpha={per_layer[n]['lora_alpha']:g}{rule(per_layer[n].get('use_rslora', False))}, "
        f"model lora_alpha={layer.lora_alpha:g}{rule(layer.use_rslora)}"
        for n, layer in lora_layers(model)
        if n in per_layer
        and (
            float(per_layer[n]["lora_alpha"]) != layer.lora_alpha
            or bool(per_layer[n].get("use_rslora", False)) != layer.use_rslora
        )
    ]
    if wrong_alpha:
        raise ValueError(
            "the model's LoRA scaling differs from the adapter's: "
            + "; ".join(wrong_alpha[:5])
            + ". Inject with the adapter's alpha and use_rslora, or load into a model without LoRA so load_lora injects it."
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
