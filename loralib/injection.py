"""Put LoRA layers into any model by module name, choose what trains, and take LoRA out again.

Which LoRA class adapts a module comes from `loralib.layers`' registry (`nn.Linear` -> `LoraLinear`,
`nn.Embedding` -> `LoraEmbedding`); nothing here knows a layer type.

Covers: `inject_lora` (from a `LoraConfig` or its fields: PEFT's matching rules, regex, "all-linear"),
`find_targets`, `mark_only_lora_as_trainable` (PEFT's and Microsoft's `bias` vocabulary plus layer norms,
embeddings and `modules_to_save`), `merge_lora`,
`unmerge_lora`, `unload_lora`, `lora_layers` to iterate over adapted layers, and `unchanged_on_failure`
(the rollback every loader uses: a failed call leaves the model as it was). Not here: the
layer itself (`loralib.layers`) and saving adapters (`loralib.adapters`).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loralib.checks import check_bool, check_choice, check_module, check_names
from loralib.config import BIAS_CHOICES, INIT_VALUES, LoraConfig, LoraSettings, config_from
from loralib.layers import LoraLayer, lora_class_for, module_kind, supported_types

# Task heads stay full-precision, fully trained modules: "all-linear" never adapts them (as PEFT).
# The heads of the classification and question-answering models this project trains.
TASK_HEADS = ("classifier", "qa_outputs")
HEAD_NAMES = (*TASK_HEADS, "lm_head", "score", "cls", "head", "pooler_head")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield (qualified name, layer) for every LoRA layer (`loralib.layers.LoraLayer`) in `model` that holds
    an adapter (a Microsoft-style layer built with r=0 holds none)."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.has_adapter:
            yield name, module


def config_of(model: nn.Module | dict[str, LoraLayer]) -> LoraConfig:
    """The `LoraConfig` that reproduces the adapters of `model` (or of {name: layer}): target_modules their
    full names, r / lora_alpha / use_rslora / lora_dropout the most common values, the other layers' in
    rank_pattern and alpha_pattern (a layer under the other scaling rule gets the alpha that gives its own
    scaling under the common one: PEFT has one rule per adapter)."""
    layers = model if isinstance(model, dict) else dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, target_modules) first.")
    common = lambda values: Counter(values).most_common(1)[0][0]  # noqa: E731
    r = common(layer.r for layer in layers.values())
    rslora = common(layer.use_rslora for layer in layers.values())
    alphas = {
        n: layer.lora_alpha
        if layer.use_rslora == rslora
        else layer.scaling * (math.sqrt(layer.r) if rslora else layer.r)
        for n, layer in layers.items()
    }
    alpha = common(alphas.values())
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=common(layer.lora_dropout_p for layer in layers.values()),
        target_modules=sorted(layers),
        use_rslora=rslora,
        init_lora_weights=INIT_VALUES[common(layer.init for layer in layers.values())],
        rank_pattern={n: layer.r for n, layer in layers.items() if layer.r != r},
        alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
        fan_in_fan_out=any(layer.base_type.__name__ == "Conv1D" for layer in layers.values()),
        lora_bias=any(layer.lora_B_bias is not None for layer in layers.values()),
        use_dora=any(layer.use_dora for layer in layers.values()),
    )


def _name_matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    if name.split(".")[0] in HEAD_NAMES:
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, NotImplementedError):
            out = None
        if out is module:
            return True
    return False


def find_targets(model: nn.Module, target_modules: LoraConfig | str | Sequence[str]) -> list[str]:
    """Names of the modules a config (or bare target_modules) selects, matched exactly like `inject_lora`.

    PEFT's rules (`LoraConfig.targets`): a list matches a module whose name equals an entry or ends with
    "." + entry; a string is a regular expression that must match the whole name; exclude_modules,
    modules_to_save and layers_to_transform apply. "all-linear" selects every linear layer LoRA adapts
    (`nn.Linear`, GPT-2's `Conv1D`) except task heads (see HEAD_NAMES) and the output embedding, as PEFT's
    does.
    """
    check_module(model)
    if isinstance(target_modules, LoraConfig):
        config = target_modules
    else:
        if not isinstance(target_modules, str):
            check_names(target_modules, "target_modules")  # None, a number or non-string entries stop here
        config = LoraConfig(target_modules=target_modules)
    if config.target_modules == "all-linear":
        linear = [
            n
            for n, m in model.named_modules()
            if getattr(lora_class_for(m), "linear_like", False)
            and not _is_head(model, n, m)
            and _bypassing_parent(model, n) is None
        ]
        if not linear:
            return []
        # As PEFT: "all-linear" becomes the layers' last name parts, then the config's other rules apply.
        leaves = tuple(sorted({n.rpartition(".")[2] for n in linear}))
        return config.targets(linear, target_modules=leaves)
    return config.targets(_candidate_names(model))


# Modules whose forward reads a child Linear's weight directly instead of calling it: LoRA on that child
# would never run. PEFT adapts them with dedicated code; here they are refused by name.
BYPASSING_PARENTS = (nn.MultiheadAttention,)


def _bypassing_parent(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding `name` when its forward bypasses `name`'s (`BYPASSING_PARENTS`), else None."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent if isinstance(parent, BYPASSING_PARENTS) else None


def _candidate_names(model: nn.Module) -> list[str]:
    """Module names a target can select: not the model itself, nor anything inside a LoRA layer."""
    inside = [n + "." for n, _ in lora_layers(model)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(p) for p in inside)]


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(lora_class_for(m), "linear_like", False)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(
    model: nn.Module,
    config: LoraConfig | str | Sequence[str] | None = None,
    *,
    exact: bool = False,
    autocast_adapter_dtype: bool = True,
    **fields: Any,
) -> list[str]:
    """Replace the modules of `model` that `config` targets, in place, by their LoRA layers; return their names.

    config: a `loralib.LoraConfig` (PEFT's fields: r, lora_alpha, lora_dropout, target_modules,
    exclude_modules, modules_to_save, rank_pattern, alpha_pattern, layers_to_transform, use_rslora,
    init_lora_weights, lora_bias, ...), or target_modules with the other fields as keywords
    (`inject_lora(model, ["query", "value"], r=16)`); keywords next to a config replace its values. The
    config is validated once, when it is made; each layer gets `config.settings_for(name)`.

    Each target's class comes from the registry (`loralib.layers.lora_class_for`): `nn.Linear` ->
    `LoraLinear`, `nn.Embedding` -> `LoraEmbedding`, convolutions, GPT-2's `Conv1D`. Matching follows PEFT:
    exclude_modules and modules_to_save are never targets; a list entry matches a name equal to it or ending
    in "." + it; a string is a regex over the whole name; "all-linear" is every linear layer but the heads.

    exact=True: target_modules are full module names (as `save_lora` records them), each adapted as named
    and nothing else; a name the model lacks is an error. Reloads use it.

    The original weights are reused and frozen (other parameters keep their flags: choose what trains with
    `mark_only_lora_as_trainable(model, config=config)`). B starts at zero, so outputs do not change until
    training. A and B are fp32 on a half-precision base unless autocast_adapter_dtype=False. Raises
    ValueError if nothing matches (listing the linear names that exist) and TypeError if a match is not a
    type LoRA adapts or already carries LoRA; the model is untouched then.
    """
    check_module(model)
    config = config_from(config, **fields)
    check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
    check_bool(exact, "exact")
    target_modules = config.target_modules
    if target_modules is None:
        raise ValueError(
            "no target_modules: name the modules to adapt, e.g. inject_lora(model, ['query', 'value']), a "
            "regex, or 'all-linear'."
        )
    if exact:
        names = list(check_names(target_modules, "target_modules", allow_empty=False))
        modules = dict(model.named_modules())
        absent = [n for n in names if n not in modules]
        if absent:
            raise ValueError(
                f"target_modules names modules this model lacks: {absent[:5]} (exact=True matches full "
                f"names only). Linear modules in this model: {', '.join(_linear_names(model)[:20])} ..."
            )
    else:
        names = find_targets(model, config)
    if not names and target_modules == "all-linear":
        adapted = [n for n, layer in lora_layers(model) if not _is_head(model, n, layer)]
        if adapted:
            raise ValueError(
                f"the model already has LoRA on every linear layer 'all-linear' selects ({len(adapted)} layers, "
                f"e.g. {adapted[:3]}); call loralib.unload_lora(model) (or unmerge and unload) before "
                "injecting again, or load an adapter into it with load_lora."
            )
    if not names:
        linears = _linear_names(model)
        shown = ", ".join(linears[:40]) + (" ..." if len(linears) > 40 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no module. Names match exactly or by their last "
            f"dotted parts (e.g. 'query' matches 'encoder.layer.0.attention.self.query'). "
            f"Linear modules in this model: {shown or '(none)'}."
        )
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if isinstance(module, LoraLayer):
            raise TypeError(
                f"the model already has LoRA on {name!r}; call loralib.unload_lora(model) before injecting "
                "again, or choose other targets."
            )
        holder = _bypassing_parent(model, name)
        if holder is not None:
            raise TypeError(
                f"{name!r} is a layer inside an nn.{type(holder).__name__}, whose forward reads its weight "
                "directly, so LoRA on it would never run; LoRA on nn.MultiheadAttention is not supported here "
                "(PEFT adapts it with its own layer). Target other layers."
            )
        if lora_class_for(module) is None:
            raise TypeError(
                f"{name!r} matched target_modules={target_modules!r} but is a {module_kind(module)}, not a type "
                f"LoRA adapts here ({supported_types()}; a subclass only if it keeps the base forward), so "
                "name the layers inside it."
            )
    new = {
        name: lora_class_for(modules[name]).from_module(
            modules[name], autocast_adapter_dtype=autocast_adapter_dtype, settings=config.settings_for(name)
        )
        for name in names
    }
    for name, layer in new.items():  # every layer is built before the model changes
        _set_module(model, name, layer)
    return names


def inject_settings(
    model: nn.Module, name: str, settings: LoraSettings, autocast_adapter_dtype: bool = True
) -> None:
    """`inject_lora` of exactly module `name` (its full name) with one layer's validated `settings`: how
    loaders rebuild a saved layer, with inject_lora's checks and errors."""
    inject_lora(
        model,
        [name],
        exact=True,
        autocast_adapter_dtype=autocast_adapter_dtype,
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        init_lora_weights=INIT_VALUES[settings.init],
        use_rslora=settings.use_rslora,
        lora_bias=settings.lora_bias,
        use_dora=settings.use_dora,
    )


def _is_layer_norm(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "layernorm" in leaf or "layer_norm" in leaf


def mark_only_lora_as_trainable(
    model: nn.Module,
    bias: str = "none",
    train_layer_norms: bool = False,
    train_embeddings: bool = False,
    modules_to_save: Iterable[str] = (),
    *,
    config: LoraConfig | None = None,
) -> None:
    """Freeze every parameter except LoRA's A and B (and lora_bias, DoRA's magnitude) and the extras asked for.

    bias: "none" (no bias trains), "all" (every bias in the model), "lora_only" (biases of
    LoRA-adapted layers): PEFT's and Microsoft loralib's meanings. modules_to_save: module names (PEFT
    matching) trained in full, e.g. the task head "classifier". config: take bias and modules_to_save from
    a `LoraConfig` (what PEFT's get_peft_model trains).
    """
    check_module(model)
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a loralib.LoraConfig, got {type(config).__name__}.")
        bias, modules_to_save = config.bias, config.modules_to_save or ()
    check_choice(bias, "bias", BIAS_CHOICES)
    check_bool(train_layer_norms, "train_layer_norms")
    check_bool(train_embeddings, "train_embeddings")
    to_save = check_names(modules_to_save, "modules_to_save")
    if not any(True for _ in lora_layers(model)):
        raise ValueError("the model has no LoRA layers; call inject_lora(model, target_modules) first.")
    for target in to_save:  # all names are checked before any flag changes
        if not any(n and _name_matches(n, [target]) for n, _ in model.named_modules()):
            raise ValueError(
                f"modules_to_save entry {target!r} matches no module; top-level modules are "
                f"{[n for n, _ in model.named_children()]}."
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if module.has_adapter:  # the active adapter's tensors (a layer may hold several: loralib.named)
                module.lora_A.requires_grad_(True)
                module.lora_B.requires_grad_(True)
                if module.lora_B_bias is not None:
                    module.lora_B_bias.requires_grad_(True)
                if module.use_dora:
                    module.lora_magnitude_vector.requires_grad_(True)
            # Microsoft's lora_only: the bias of every LoRA layer (an r=0 one too)
            if bias == "lora_only" and getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(True)
        if train_layer_norms and _is_layer_norm(name, module):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        if train_embeddings and isinstance(module, nn.Embedding) and not isinstance(module, LoraLayer):
            module.weight.requires_grad_(True)
    if bias == "all":  # PEFT's and Microsoft's rule: every parameter whose name contains "bias"
        for name, p in model.named_parameters():
            if "bias" in name:
                p.requires_grad_(True)
    for target in to_save:
        for m in [m for n, m in model.named_modules() if n and _name_matches(n, [target])]:
            head = getattr(m, "head", None)  # a head copied per named adapter trains the active copy
            for p in (head() if callable(head) and hasattr(m, "heads") else m).parameters():
                p.requires_grad_(True)


def _check_untied(model: nn.Module) -> None:
    """Refuse to merge into a weight whose storage another parameter or buffer shares (an lm_head tied
    to the input embedding): the merge would silently change that tensor too; and refuse any layer that
    cannot hold a merged update (a grouped convolution), before anything is merged."""
    owners: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if t.device.type != "meta":
            # The tensor's own address, not its storage's: a loader may place many parameters as views
            # of one flat buffer, and those are not tied.
            owners.setdefault(t.data_ptr(), []).append(name)
    problems = [f"{n}: {layer.merge_problem()}" for n, layer in lora_layers(model) if layer.merge_problem()]
    if problems:
        raise ValueError(
            f"cannot merge LoRA into every layer ({'; '.join(problems[:3])}); nothing was merged."
        )
    for name, layer in lora_layers(model):
        if layer.merged:
            continue
        own = f"{name}.{layer.weight_key}" if name else layer.weight_key
        others = [n for n in owners.get(layer.weight.data_ptr(), []) if n != own]
        if others:
            raise ValueError(
                f"cannot merge LoRA into {name}.weight: it shares its storage with {others[:3]} (tied weights, "
                "e.g. an lm_head tied to the input embedding), which the merge would change too. Keep this layer "
                f"unmerged, or untie first (model.get_submodule({name!r}).weight = "
                "torch.nn.Parameter(<that weight>.clone(), requires_grad=False), and config.tie_word_embeddings=False)."
            )


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its frozen weight (idempotent); returns the model.

    Refuses (before changing anything) when an adapted weight is tied to another tensor of the model.
    """
    check_module(model)
    _check_untied(model)
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (idempotent); returns the model."""
    check_module(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then put the base modules back (`nn.Linear`, `nn.Embedding`): a stock model with the original
    state-dict keys. With several named adapters (`loralib.named`) the active one is merged, the others are
    dropped, and each task head copied per adapter becomes the active adapter's head."""
    from loralib.layers.slots import AdapterHeads

    check_module(model)
    _check_untied(model)
    named_absent = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and not m.has_adapter and m.__dict__.get("_lora_absent", False)
    ]
    for name, layer in [*lora_layers(model), *named_absent]:
        _set_module(model, name, layer.to_base())  # a layer without the active adapter: its frozen module
    for name, heads in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterHeads)]:
        _set_module(model, name, heads.head())
    model.__dict__.pop("_lora_adapter_values", None)  # carried values: the active adapter's are in place
    return model


@contextlib.contextmanager
def unchanged_on_failure(model: nn.Module, params: Iterable[str] = ()) -> Iterator[None]:
    """Run a block that changes `model`; if it raises, put the model back exactly as it was.

    Restored: which module sits where (injected layers are swapped back out), every parameter's
    requires_grad, every LoRA layer's alpha, scaling rule (use_rslora) and merged flag, and the values of
    `params` (the parameter names the block may overwrite; only those are copied, so the cost is the
    adapter's size, not the model's).
    """
    modules = dict(model.named_modules())
    children = {name: dict(m.named_children()) for name, m in modules.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    scalars = {layer: (layer.lora_alpha, layer.use_rslora, layer.merged) for _, layer in lora_layers(model)}
    from loralib.named import active_parameters  # it builds on this module

    named = {**dict(model.named_parameters()), **active_parameters(model)}
    saved = {named[n]: named[n].detach().clone() for n in params if n in named}
    try:
        yield
    except BaseException:
        for name, kids in children.items():
            module = modules[name]
            for child_name, child in kids.items():
                if module._modules.get(child_name) is not child:
                    setattr(module, child_name, child)
        with torch.no_grad():
            for p, value in saved.items():
                p.copy_(value)
        for p, flag in flags:
            p.requires_grad_(flag)
        for layer, (alpha, rslora, merged) in scalars.items():
            # the raw values: the weights are restored as they were, so nothing is re-merged
            layer._lora_alpha, layer._use_rslora, layer.merged = alpha, rslora, merged
        raise
