"""Two-way conversion between loralib adapters and PEFT's LoRA adapter format, with identical outputs.

`to_peft(model, directory, base_model_name_or_path=...)` writes `adapter_config.json` and
`adapter_model.safetensors` exactly as `PeftModel.save_pretrained` would for the same adapter, so
`PeftModel.from_pretrained(base, directory)` (or `AutoPeftModelFor...`, the Hub, vLLM, ...) rebuilds our
model's function. `from_peft(model, directory)` loads a PEFT LoRA adapter into a plain transformers model
as loralib layers (`LoraLinear`, `LoraEmbedding`; or into one that already has matching loralib layers).

The mapping, which is all there is to it (each layer class names its PEFT keys: `LoraLayer.peft_names`):
    loralib                          PEFT (saved keys, prefix "base_model.model.")
    <m>.lora_A  (r x in)             <m>.lora_A.weight  (r x in)     same matrix, same layout
    <m>.lora_B  (out x r)            <m>.lora_B.weight  (out x r)
    embedding <e>.lora_A (r x vocab) <e>.lora_embedding_A  (r x vocab)
    embedding <e>.lora_B (dim x r)   <e>.lora_embedding_B  (dim x r)
    lora_alpha, use_rslora           lora_alpha, use_rslora (one rule per adapter; a layer with the
                                     other rule gets the equivalent alpha in alpha_pattern), per layer
                                     via rank_pattern / alpha_pattern
    trained bias of an adapted <m>   <m>.base_layer.bias (bias="all" or "lora_only")
    other trained modules            modules_to_save: the whole module, saved under its own name

Neither direction imports `peft`: the format is JSON plus safetensors, so a loralib user can export
without installing it (the tests use PEFT itself as the reference, including PEFT's own LoRA test table).
DoRA's magnitude is `<m>.lora_magnitude_vector` in both (PEFT's key has no ".weight"; a convolution's is
(1, out, 1, ...) there, (out,) here). An adapter_config.json is read through `loralib.LoraConfig.from_dict`,
so what loralib does not reproduce (trainable tokens, initialisations that change the base such as PiSSA or LoftQ, unknown fields) is
refused by name before the model changes; PEFT's layer for a type loralib lacks (nn.MultiheadAttention) too. `lora_bias` (a bias on lora_B) maps to `<m>.lora_B.bias`. Convolutions use PEFT's conv layout (lora_A.weight a kernel,
lora_B.weight a 1x1 kernel). GPT-2's Conv1D layers are PEFT's
`fan_in_fan_out=True` (written when the model has one; the factors' layout is a Linear's). Several named
adapters (`loralib.named`): `to_peft(..., adapter_name=)` / `from_peft(..., adapter_name=)` one at a time, and
`to_peft_all` in PEFT's layout for several ("default" at the root, each other one in a sub-directory). Not here: loralib's own format (`loralib.adapters`), PEFT training and QLoRA
(`loralib.peft_backend`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from loralib.checks import check_alpha, check_bool, check_choice, check_module
from loralib.config import LoraConfig, LoraSettings
from loralib.files import atomic_directory, read_files, safetensors_from_bytes
from loralib.injection import HEAD_NAMES, config_of, inject_lora, lora_layers, unchanged_on_failure
from loralib.layers import LORA_TENSORS, LoraLayer, lora_class_for, supported_types
from loralib.layers.dora import MAGNITUDE
from loralib.layers.slots import DEFAULT_ADAPTER
from loralib.named import active_parameters, adapter_names, head_modules, loading_into, using_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT's task types by the transformers class-name suffix (order matters: longest match first).
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def _suffix_cover(wanted: set[str], universe: Sequence[str], match) -> list[str]:
    """Short PEFT-style names that select exactly `wanted` among `universe`, else full names.

    Tries the last one and two dotted parts of every wanted name (e.g. "query", "output.dense"); a
    candidate is used only if everything it matches is wanted, so the result never over-selects.
    """
    cover: list[str] = []
    covered: set[str] = set()
    for parts in (1, 2):
        for name in sorted(wanted):
            cand = ".".join(name.split(".")[-parts:])
            if name in covered or cand in cover:
                continue
            hits = {u for u in universe if match(u, cand)}
            if hits and hits <= wanted:
                cover.append(cand)
                covered |= hits
    cover += sorted(wanted - covered)
    return cover


def _target_match(name: str, target: str) -> bool:  # PEFT's target_modules rule for a list
    return name == target or name.endswith("." + target)


def _save_match(name: str, target: str) -> bool:  # PEFT's modules_to_save rule (plain suffix)
    return name.endswith(target)


def _pattern_match(name: str, key: str) -> bool:  # PEFT's rank_pattern / alpha_pattern rule
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _tied_to_outside(model: nn.Module, module_name: str) -> bool:
    """True when a parameter of `module_name` shares its storage with a parameter outside it."""
    inside = {p.data_ptr() for p in model.get_submodule(module_name).parameters()}
    return any(
        p.data_ptr() in inside
        for n, p in model.named_parameters(remove_duplicate=False)
        if not n.startswith(module_name + ".")
    )


def _modules_to_save(model: nn.Module, extras: set[str], lora_names: set[str], heads: set[str]) -> list[str]:
    """Smallest set of modules whose parameters cover `extras` (trained non-LoRA tensors), plus the heads.

    A module is lifted to its parent while every parameter of the parent is trained and the parent holds
    no LoRA layer, so a fully trained head becomes "classifier" rather than its four tensors.
    """
    modules = dict(model.named_modules())
    chosen: set[str] = set(heads)
    for pname in extras:
        owner = _owner(pname)
        if not owner or any(n.startswith(owner + ".") for n in lora_names):
            raise ValueError(
                f"{pname} is trained but belongs to {owner or 'the model itself'!r}, which also holds LoRA layers; "
                "PEFT saves extra trained tensors only as whole modules (modules_to_save) without LoRA inside."
            )
        if owner in lora_names:
            raise ValueError(
                f"{pname} is trained, but PEFT can only express trained tensors of a LoRA layer through its bias "
                "setting (bias='all' or 'lora_only'); freeze it, or train the biases of all LoRA layers."
            )
        while owner:
            parent = owner.rpartition(".")[0]
            if not parent or parent not in modules:
                break
            pmod = modules[parent]
            names = [f"{parent}.{n}" for n, _ in pmod.named_parameters()]
            if any(n.startswith(parent + ".") for n in lora_names) or not set(names) <= extras | {
                f"{h}.{n}" for h in heads for n, _ in modules[h].named_parameters()
            }:
                break
            owner = parent
        chosen.add(owner)
    # Drop entries inside another chosen module.
    return sorted(c for c in chosen if not any(c.startswith(o + ".") for o in chosen if o != c))


def _bias_mode(params: dict[str, torch.Tensor], layers: dict[str, LoraLayer], extras: set[str]):
    """PEFT's `bias` setting that covers the trained biases, and their names: "all" saves every bias,
    "lora_only" those of adapted layers, "none" none."""
    all_biases = {n for n in params if n.endswith(".bias")}
    lora_biases = {f"{n}.bias" for n, layer in layers.items() if getattr(layer, "bias", None) is not None}
    if all_biases and all_biases <= extras:
        return "all", all_biases
    if lora_biases and lora_biases <= extras:
        return "lora_only", lora_biases
    return "none", set()


def _adapter_fields(layers: dict[str, LoraLayer]) -> dict[str, Any]:
    """r, lora_alpha, lora_dropout, patterns, use_rslora, lora_bias and fan_in_fan_out for PEFT
    (`loralib.injection.config_of`), with a warning where layers' dropouts differ (PEFT has one)."""
    dropouts = Counter(layer.lora_dropout_p for layer in layers.values())
    if len(dropouts) > 1:
        warnings.warn(
            f"LoRA dropout differs between layers {dict(dropouts)}; PEFT has one lora_dropout, "
            f"{dropouts.most_common(1)[0][0]} is written (dropout only matters for training).",
            stacklevel=4,
        )
    d = config_of(layers).to_dict()
    keys = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "lora_bias",
        "use_dora",
    )
    return {k: d[k] for k in (*keys, "fan_in_fan_out")}


def peft_state_and_config(
    model: nn.Module,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
    save_heads: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config) in PEFT's format for a model with loralib LoRA layers. See `to_peft`."""
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, target_modules) first.")
    formless = [f"{n} ({type(layer).__name__})" for n, layer in layers.items() if layer.peft_names is None]
    if formless:
        raise ValueError(
            f"{', '.join(formless[:3])}: this layer type has no PEFT form (Microsoft's MergedLinear and "
            "ConvLoRA factor the update differently from any PEFT layer); save it with save_lora instead."
        )
    doras = {layer.use_dora for layer in layers.values()}
    if len(doras) > 1:
        dora_names = [n for n, layer in layers.items() if layer.use_dora]
        raise ValueError(
            f"some LoRA layers are DoRA ({dora_names[:3]}) and others are not; a PEFT adapter has one use_dora for "
            "all its layers. Save it with save_lora, or make every layer the same kind."
        )
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not base:
        raise ValueError(
            "PEFT needs base_model_name_or_path (the hub id or directory the frozen weights come from); "
            "the model's config records none, so pass base_model_name_or_path=..."
        )
    params = active_parameters(model)
    lora_names = set(layers)
    lora_keys = {f"{n}.{k}" for n in layers for k in LORA_TENSORS}
    extras = {n for n, p in params.items() if p.requires_grad and n not in lora_keys}

    bias_mode, bias_keys = _bias_mode(params, layers, extras)
    top = {n for n, _ in model.named_children()}
    # A head that itself carries LoRA cannot also be a PEFT modules_to_save copy.
    heads = {
        h for h in HEAD_NAMES if h in top and not any(n == h or n.startswith(h + ".") for n in lora_names)
    }
    # A head tied to the input embedding (a causal LM's lm_head) is the embedding itself, frozen: it is
    # part of the base, not of the adapter, so PEFT would not save it.
    heads = {h for h in heads if not _tied_to_outside(model, h)} if save_heads else set()
    to_save = _modules_to_save(model, extras - bias_keys, lora_names, heads)
    in_saved = {n for n in params if any(n.startswith(m + ".") for m in to_save)}

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.{layer.peft_names['lora_A']}"] = layer.lora_A.detach()
        tensors[f"{PREFIX}{name}.{layer.peft_names['lora_B']}"] = layer.lora_B.detach()
        if layer.lora_B_bias is not None:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = layer.lora_B_bias.detach()
        if layer.use_dora:  # PEFT's key has no ".weight"; a convolution's magnitude is (1, out, 1, ...)
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.peft_magnitude().detach()
    for n in sorted(bias_keys | in_saved):
        owner, _, leaf = n.rpartition(".")
        key = f"{owner}.base_layer.{leaf}" if owner in lora_names else n
        tensors[PREFIX + key] = params[n].detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}

    all_names = [n for n, _ in model.named_modules() if n]
    if task_type == "auto":
        task_type = _infer_task_type(model)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": str(base),
        "revision": None,
        **_adapter_fields(layers),
        "target_modules": _suffix_cover(lora_names, all_names, _target_match),
        "modules_to_save": _suffix_cover(set(to_save), all_names, _save_match) or None,
        "bias": bias_mode,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return tensors, config


def to_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
    save_heads: bool = True,
    *,
    adapter_name: str | None = None,
) -> Path:
    """Write the loralib adapter of `model` as a PEFT LoRA adapter into `directory`; return the directory.

    adapter_name: which named adapter (default: the active one); `to_peft_all` writes every one in
    PEFT's layout for several adapters.

    `PeftModel.from_pretrained(base, directory)` then computes what `model` computes, where `base` is
    the stock model loaded from base_model_name_or_path (default: the model config's name_or_path) with
    the same head size. Every LoRA layer is exported with its rank and alpha (PEFT scaling lora_alpha / r,
    per-layer values as rank_pattern / alpha_pattern). Trained tensors outside LoRA become PEFT's `bias`
    setting and `modules_to_save`. task_type: "auto" infers SEQ_CLS / QUESTION_ANS / ... from the model
    class (PEFT then also expects the head in the file). save_heads: always save the task heads
    (classifier, qa_outputs) in full, trained or not, because a fresh `from_pretrained` initialises them
    at random. The directory is written as one atomic unit (`loralib.files.atomic_directory`).
    """
    _check_export(model, directory, task_type, save_heads)
    with using_adapter(model, adapter_name) if adapter_name is not None else contextlib.nullcontext():
        tensors, config = peft_state_and_config(model, base_model_name_or_path, task_type, save_heads)
    directory = Path(directory)
    with atomic_directory(directory) as stage:
        _write_peft(stage, tensors, config)
    return directory


def _check_export(model: nn.Module, directory, task_type: str | None, save_heads: bool) -> None:
    """The arguments `to_peft` and `to_peft_all` share, checked before anything is computed or written."""
    check_module(model)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}.")
    if task_type is not None and task_type != "auto":
        check_choice(task_type, "task_type", ("auto", *dict.fromkeys(t for _, t in _TASK_TYPES)))
    check_bool(save_heads, "save_heads")


def _write_peft(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def to_peft_all(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
    save_heads: bool = True,
) -> Path:
    """Write every named adapter as PEFT's `save_pretrained` does for several: "default" in `directory`
    itself, each other one in `directory/<name>/` (`PeftModel.from_pretrained(base, directory)` then
    `load_adapter(directory/<name>, adapter_name=<name>)`). Atomic as a whole; returns the directory."""
    _check_export(model, directory, task_type, save_heads)
    parts = {}
    for name in adapter_names(model):
        with using_adapter(model, name):
            parts[name] = peft_state_and_config(model, base_model_name_or_path, task_type, save_heads)
    directory = Path(directory)
    with atomic_directory(directory) as stage:
        for name, (tensors, config) in parts.items():
            _write_peft(stage if name == DEFAULT_ADAPTER else stage / name, tensors, config)
    return directory


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, tensors without the "base_model.model." prefix) of a PEFT adapter directory."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory: not a PEFT adapter directory.")
    # One handle on the directory for every file: a save running meanwhile swaps whole directories, so
    # the config and the tensors always come from the same adapter.
    files = read_files(d, [CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "lora_config.json"])
    if files[CONFIG_NAME] is None:
        hint = (
            " (it looks like a loralib adapter: use loralib.load_lora)" if files["lora_config.json"] else ""
        )
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}: not a PEFT adapter directory{hint}.")
    if files[WEIGHTS_NAME] is None:
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {d}"
            + (
                " (only the pickle adapter_model.bin: re-save it with safe_serialization=True)."
                if files["adapter_model.bin"] is not None
                else "."
            )
        )
    try:
        config = json.loads(files[CONFIG_NAME])
    except ValueError as e:
        raise ValueError(
            f"{cfg_path} is not valid JSON ({e}); it should be a PEFT adapter_config.json."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} is not a JSON object; it should be a PEFT adapter_config.json.")
    tensors, _ = safetensors_from_bytes(files[WEIGHTS_NAME], w_path)
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _check_supported(config: dict[str, Any], directory) -> LoraConfig:
    """The adapter's config as a `LoraConfig`; anything loralib does not reproduce (trainable tokens,
    initialisations that change the base, unknown fields) is refused by name (`LoraConfig.from_dict`)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory} holds a {config.get('peft_type')!r} adapter; from_peft reads LoRA adapters only."
        )
    return LoraConfig.from_dict(config, source=f"{directory}/{CONFIG_NAME}")


def _group_tensors(
    tensors: dict[str, torch.Tensor], directory
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {"lora_A", "lora_B", "kind"}}, {parameter name: tensor} for everything else) of a PEFT
    file; kind is "linear" (lora_A.weight / lora_B.weight) or "embedding" (lora_embedding_A / _B)."""
    # PEFT's bias="all" files can also hold redundant copies from inside its wrappers: skip those.
    tensors = {
        k: v for k, v in tensors.items() if ".original_module." not in k and ".modules_to_save." not in k
    }
    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        magnitude = re.fullmatch(rf"(.+)\.{MAGNITUDE}(?:\.[^.]+)?(?:\.weight)?", key)
        if magnitude:  # DoRA; older PEFT versions saved "<m>.lora_magnitude_vector.weight"
            lora.setdefault(magnitude.group(1), {})[MAGNITUDE] = value
            continue
        bias = re.fullmatch(r"(.+)\.lora_B(?:\.[^.]+)?\.bias", key)
        if bias:
            lora.setdefault(bias.group(1), {"kind": "linear"})["lora_B_bias"] = value
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        e = re.fullmatch(r"(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", key)
        if m or e:
            name, factor, kind = (
                (m.group(1), m.group(2), "linear") if m else (e.group(1), f"lora_{e.group(2)}", "embedding")
            )
            entry = lora.setdefault(name, {})
            if entry.setdefault("kind", kind) != kind:
                raise ValueError(f"{directory} names {name!r} both as a Linear and as an Embedding adapter.")
            entry[factor] = value
        elif ".lora_" in key:
            raise ValueError(
                f"{directory} holds {key!r}: this kind of LoRA tensor is not supported by loralib."
            )
        else:
            other[key.replace(".base_layer.", ".")] = value
    if not lora:
        raise ValueError(f"{directory} holds no lora_A/lora_B tensors.")
    incomplete = [
        n for n, ab in lora.items() if set(ab) - {"lora_B_bias", MAGNITUDE} != {"lora_A", "lora_B", "kind"}
    ]
    if incomplete:
        raise ValueError(f"{directory} is incomplete: lora_A or lora_B missing for {incomplete[:5]}.")
    return lora, other


def _alpha_for(config: dict[str, Any], name: str, r: int, directory) -> float:
    """Our alpha for layer `name`: lora_alpha or its alpha_pattern entry (use_rslora is kept as the rule)."""
    pattern = config.get("alpha_pattern") or {}
    key = next((k for k in pattern if _pattern_match(name, k)), None)
    alpha = check_alpha(pattern[key] if key is not None else config.get("lora_alpha"), "lora_alpha")
    if alpha is None:
        raise ValueError(f"{directory}/{CONFIG_NAME} has no lora_alpha; it is not a complete PEFT adapter.")
    return alpha


def from_peft(
    model: nn.Module, directory: str | os.PathLike, trainable: bool = True, *, adapter_name: str | None = None
) -> dict[str, Any]:
    """Load the PEFT LoRA adapter in `directory` into `model` as loralib layers; return its config.

    `model` is the stock transformers model the adapter was trained on (same architecture and head size),
    or one that already carries loralib layers on exactly the adapter's modules with the same ranks.
    Which modules are adapted, and their ranks, are read from the tensors themselves, so adapters made
    with regex targets, "all-linear" or layers_to_transform load too; alpha comes from lora_alpha /
    alpha_pattern and the layers scale as PEFT's use_rslora says. Biases and modules_to_save tensors are
    copied into the model's own parameters (a PEFT "modules_to_save" copy becomes the module itself).
    trainable: leave exactly the adapter's tensors trainable (what PEFT trains), everything else frozen.
    Mismatches (targets, rank, shapes of another base or head size) raise ValueError naming them.

    adapter_name: load it as this named adapter beside the model's others (PEFT's `load_adapter`; see
    `loralib.named`), with its own head copy (any head size) and its own values of other tensors.
    """
    check_module(model)
    check_bool(trainable, "trainable")
    if adapter_name is not None:
        config, tensors = read_peft_adapter(directory)
        lora, other = _group_tensors(tensors, directory)
        use_dora = _check_supported(config, directory).use_dora
        settings = {
            name: LoraSettings(
                r=ab["lora_A"].shape[0],
                lora_alpha=_alpha_for(config, name, ab["lora_A"].shape[0], directory),
                lora_dropout=float(config.get("lora_dropout") or 0.0),
                use_rslora=bool(config.get("use_rslora", False)),
                lora_bias="lora_B_bias" in ab,
                use_dora=use_dora,
            )
            for name, ab in lora.items()
        }
        with loading_into(model, adapter_name, settings, other, head_modules(model, other)):
            return from_peft(model, directory, trainable)
    config, tensors = read_peft_adapter(directory)
    use_dora = _check_supported(config, directory).use_dora
    base_name = config.get("base_model_name_or_path")
    mine = getattr(getattr(model, "config", None), "_name_or_path", None)

    lora, other = _group_tensors(tensors, directory)

    modules = dict(model.named_modules())
    absent = [n for n in lora if n not in modules]
    for (
        name
    ) in absent:  # PEFT's own layer for a type loralib lacks (nn.MultiheadAttention: <m>.base_layer...)
        owner = name.split(".base_layer")[0]
        if owner in modules and lora_class_for(modules[owner]) is None:
            raise ValueError(
                f"the adapter adapts {owner!r}, a {type(modules[owner]).__name__}, with PEFT's own layer for it; "
                f"loralib adapts {supported_types()} only, so it cannot load this adapter."
            )
    if absent:
        raise ValueError(
            f"the adapter targets modules this model lacks, e.g. {absent[:4]}; it was made for "
            f"{base_name!r} (this model: {mine!r}). Load it into the same architecture."
        )
    have = dict(lora_layers(model))
    ranks = {n: ab["lora_A"].shape[0] for n, ab in lora.items()}
    if have:
        extra, missing = sorted(set(have) - set(lora)), sorted(set(lora) - set(have))
        if extra or missing:
            raise ValueError(
                f"the model's LoRA targets differ from the adapter's: only in the model {extra[:4]}, only in the "
                f"adapter {missing[:4]}. Load into a model without LoRA (from_peft injects it) or inject the same targets."
            )
        bad = [f"{n}: model r={have[n].r}, adapter r={ranks[n]}" for n in lora if have[n].r != ranks[n]]
        if bad:
            raise ValueError(
                f"LoRA rank mismatch: {'; '.join(bad[:4])}. Inject with the adapter's rank (r={config.get('r')})."
            )
    if base_name and mine and str(base_name) != str(mine):
        warnings.warn(
            f"the adapter was trained on {base_name!r}, this model is {mine!r}; outputs match only if the "
            "frozen weights are the same.",
            stacklevel=2,
        )

    # Check every shape before changing the model, so a mismatch leaves it untouched.
    problems = []
    for name, ab in lora.items():
        mod = modules[name]
        cls = type(mod) if isinstance(mod, LoraLayer) else lora_class_for(mod)
        embedding = ab["kind"] == "embedding"
        if cls is None or (cls.base_type is nn.Embedding) != embedding:
            wanted = "an Embedding" if embedding else "a Linear or Conv1D"
            problems.append(f"{name} is a {type(mod).__name__}, and the adapter's tensors are for {wanted}")
            continue
        if "lora_B_bias" in ab and cls.base_type is nn.Embedding:
            problems.append(f"{name}: the adapter has a lora_B bias, which embeddings do not support")
            continue
        if isinstance(mod, LoraLayer) and (mod.lora_B_bias is not None) != ("lora_B_bias" in ab):
            problems.append(f"{name}: lora_bias differs between the model's layer and the adapter")
            continue
        if (MAGNITUDE in ab) != use_dora:
            problems.append(
                f"{name}: the config says use_dora={use_dora} but the file "
                + ("has" if MAGNITUDE in ab else "lacks")
                + f" its {MAGNITUDE}"
            )
            continue
        if isinstance(mod, LoraLayer) and mod.use_dora != use_dora:
            problems.append(f"{name}: the model's layer has use_dora={mod.use_dora}, the adapter {use_dora}")
            continue
        if use_dora and ab[MAGNITUDE].numel() != cls.adapter_shapes(mod, ranks[name])[1][0]:
            problems.append(
                f"{name}: adapter {MAGNITUDE} {tuple(ab[MAGNITUDE].shape)} has the wrong number of output features"
            )
            continue
        want_a, want_b = cls.adapter_shapes(mod, ranks[name])
        if "lora_B_bias" in ab and tuple(ab["lora_B_bias"].shape) != (want_b[0],):
            problems.append(f"{name}: adapter lora_B bias {tuple(ab['lora_B_bias'].shape)} vs ({want_b[0]},)")
        if tuple(ab["lora_A"].shape) != want_a or tuple(ab["lora_B"].shape) != want_b:
            problems.append(
                f"{name}: adapter A {tuple(ab['lora_A'].shape)} B {tuple(ab['lora_B'].shape)} vs the layer's "
                f"A {want_a} B {want_b}"
            )
    params = active_parameters(model)
    for key, value in other.items():
        if key not in params:
            problems.append(f"{key} is not a parameter of this model")
        elif tuple(params[key].shape) != tuple(value.shape):
            problems.append(f"{key}: adapter {tuple(value.shape)} vs model {tuple(params[key].shape)}")
    if problems:
        raise ValueError(
            f"the PEFT adapter in {directory} does not fit this model ({len(problems)} problems: "
            + "; ".join(problems[:5])
            + f"). It was trained on {base_name!r} (this model: {mine!r}); a different hidden size means another "
            "base, a different head shape another num_labels (load the base with the adapter's head size)."
        )

    merged = [n for n, layer in have.items() if layer.merged]
    if merged:
        raise ValueError(
            f"LoRA layers {merged[:3]} are merged; call unmerge_lora(model) before loading an adapter."
        )
    dropout = float(config.get("lora_dropout") or 0.0)
    rslora = bool(config.get("use_rslora", False))
    alphas = {
        name: _alpha_for(config, name, ranks[name], directory) for name in lora
    }  # a NaN or missing alpha fails here, not half-way
    # Everything is checked; a failure from here on (an exotic dtype, a device error) still leaves the
    # model as it was.
    factors = [f"{n}.{k}" for n, ab in lora.items() for k in LORA_TENSORS if k in ab]
    with unchanged_on_failure(model, params=[*factors, *other]):
        if not have:
            for name in lora:
                inject_lora(
                    model,
                    [name],
                    r=ranks[name],
                    lora_alpha=alphas[name],
                    lora_dropout=dropout,
                    use_rslora=rslora,
                    lora_bias="lora_B_bias" in lora[name],
                    use_dora=use_dora,
                    exact=True,  # the adapter's full module names: nothing else is adapted
                )
            have = dict(lora_layers(model))
        else:
            for name in lora:  # same rank already checked; take the adapter's scaling
                layer = have[name]
                layer.lora_alpha, layer.use_rslora = alphas[name], rslora
        params = active_parameters(model)
        with torch.no_grad():
            for name, ab in lora.items():
                layer: LoraLayer = have[name]
                layer.lora_A.copy_(ab["lora_A"].to(layer.lora_A.dtype))
                layer.lora_B.copy_(ab["lora_B"].to(layer.lora_B.dtype))
                if "lora_B_bias" in ab:
                    layer.lora_B_bias.copy_(ab["lora_B_bias"].to(layer.lora_B_bias.dtype))
                if MAGNITUDE in ab:
                    m = layer.lora_magnitude_vector
                    m.copy_(ab[MAGNITUDE].reshape(-1).to(m.dtype))
            for key, value in other.items():
                params[key].copy_(value.to(dtype=params[key].dtype, device=params[key].device))
        if trainable:
            keep = set(factors) | set(other)
            for p in model.parameters():
                p.requires_grad_(False)
            for n, p in active_parameters(model).items():
                p.requires_grad_(n in keep)
    return config
