"""Put LoRA layers into any model by module name, choose what trains, and take LoRA out again.

Which LoRA class adapts a module comes from `loralib.layers`' registry (`nn.Linear` -> `LoraLinear`,
`nn.Embedding` -> `LoraEmbedding`); nothing here knows a layer type.

Covers: `inject_lora` (PEFT-style name matching, regex, "all-linear"), `mark_only_lora_as_trainable`
(PEFT's `bias` vocabulary plus layer norms, embeddings and `modules_to_save`), `merge_lora`,
`unmerge_lora`, `unload_lora`, `lora_layers` to iterate over adapted layers, and `unchanged_on_failure`
(the rollback every loader uses: a failed call leaves the model as it was). Not here: the
layer itself (`loralib.layers`) and saving adapters (`loralib.adapters`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from loralib.checks import check_bool, check_choice, check_module, check_names
from loralib.layers import LoraLayer, check_lora_args, lora_class_for, module_kind, supported_types

# Task heads stay full-precision, fully trained modules: "all-linear" never adapts them (as PEFT).
# The heads of the classification and question-answering models this project trains.
TASK_HEADS = ("classifier", "qa_outputs")
HEAD_NAMES = (*TASK_HEADS, "lm_head", "score", "cls", "head", "pooler_head")
BIAS_CHOICES = ("none", "all", "lora_only")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield (qualified name, layer) for every LoRA layer (`loralib.layers.LoraLayer`) in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


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


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules `target_modules` selects, matched exactly like `inject_lora` does.

    A list matches a module whose name equals an entry or ends with "." + entry (PEFT's rule);
    a string is a regular expression that must match the whole name; "all-linear" selects every
    linear layer LoRA adapts (`nn.Linear`, GPT-2's `Conv1D`) except task heads (see HEAD_NAMES) and the
    output embedding, as PEFT's does.
    """
    check_module(model)
    if not isinstance(target_modules, str):
        check_names(target_modules, "target_modules")  # None, a number or non-string entries stop here
    if isinstance(target_modules, str) and target_modules == "all-linear":
        return [
            n
            for n, m in model.named_modules()
            if getattr(lora_class_for(m), "linear_like", False)
            and not _is_head(model, n, m)
            and _bypassing_parent(model, n) is None
        ]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regular expression: {e}"
            ) from e
        return [n for n in _candidate_names(model) if pattern.fullmatch(n)]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be non-empty module names, got {target_modules!r}.")
    return [n for n in _candidate_names(model) if _name_matches(n, targets)]


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
    target_modules: str | Sequence[str],
    *,
    r: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    init: str = "kaiming",
    autocast_adapter_dtype: bool = True,
    use_rslora: bool = False,
    lora_bias: bool = False,
    exact: bool = False,
) -> list[str]:
    """Replace the targeted modules of `model` in place by their LoRA layers; return their names.

    Each target's class comes from the registry (`loralib.layers.lora_class_for`): `nn.Linear` ->
    `LoraLinear`, `nn.Embedding` -> `LoraEmbedding`.

    exact=True: `target_modules` is a list of full module names (as `save_lora` records them), each
    adapted as named and nothing else; a name the model lacks is an error. Reloads use it, so an adapter
    saved from layers chosen by a pattern reloads into exactly those layers.

    r, lora_alpha (None: = r), lora_dropout, init, use_rslora (scale by lora_alpha / sqrt(r)), lora_bias
    (PEFT's: a trainable bias on B's output; not for embeddings): as for
    `LoraLinear` (PEFT's names, keyword-only). The original weights are
    reused and frozen; B starts at zero so outputs do not change until training. A and B are fp32 on a
    half-precision base unless autocast_adapter_dtype=False. Raises ValueError if nothing matches
    (listing the Linear names that exist) and TypeError if a match is not an `nn.Linear` or already
    carries LoRA; the model is untouched then. "all-linear" selects Linear layers only (as PEFT).
    """
    check_module(model)
    r, lora_alpha, lora_dropout = check_lora_args(r, lora_alpha, lora_dropout, init)
    check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
    check_bool(use_rslora, "use_rslora")
    check_bool(lora_bias, "lora_bias")
    check_bool(exact, "exact")
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
        names = find_targets(model, target_modules)
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
            modules[name],
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init=init,
            autocast_adapter_dtype=autocast_adapter_dtype,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
        )
        for name in names
    }
    for name, layer in new.items():  # every layer is built before the model changes
        _set_module(model, name, layer)
    return names


def _is_layer_norm(name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "layernorm" in leaf or "layer_norm" in leaf


def mark_only_lora_as_trainable(
    model: nn.Module,
    bias: str = "none",
    train_layer_norms: bool = False,
    train_embeddings: bool = False,
    modules_to_save: Iterable[str] = (),
) -> None:
    """Freeze every parameter except LoRA's A and B and the extras asked for.

    bias: "none" (no bias trains), "all" (every bias in the model), "lora_only" (biases of
    LoRA-adapted layers). modules_to_save: module names (PEFT matching) trained in full, e.g. the
    task head "classifier".
    """
    check_module(model)
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
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if module.lora_B_bias is not None:
                module.lora_B_bias.requires_grad_(True)
            if bias == "lora_only" and getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(True)
        if train_layer_norms and _is_layer_norm(name, module):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        if train_embeddings and isinstance(module, nn.Embedding) and not isinstance(module, LoraLayer):
            module.weight.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    for target in to_save:
        for m in [m for n, m in model.named_modules() if n and _name_matches(n, [target])]:
            for p in m.parameters():
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
        others = [n for n in owners.get(layer.weight.data_ptr(), []) if n != f"{name}.weight"]
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
    state-dict keys."""
    check_module(model)
    _check_untied(model)
    for name, layer in list(lora_layers(model)):
        _set_module(model, name, layer.to_base())
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
    named = dict(model.named_parameters())
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
