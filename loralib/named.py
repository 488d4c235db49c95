"""One frozen model, many named adapters: add, switch, delete, combine, and a batch whose rows differ.

LoRA's promise is task switching: one backbone in memory and a small adapter per task. Here a model
holds adapters by name (PEFT's vocabulary: `add_adapter`, `set_adapter`, `delete_adapter`,
`active_adapter`, `add_weighted_adapter`, and "default" for the first one):

* each LoRA layer holds its adapters (`loralib.layers.slots`): the active one computes;
* each task head listed in an adapter's `modules_to_save` becomes an `AdapterHeads`: a copy per adapter
  (of any size: nine GLUE heads of 1, 2 or 3 labels serve from one model);
* other trained tensors an adapter carries (the article's recipe trains every bias and layer norm) are
  kept per adapter and copied into the shared parameters when it becomes active (`adapter_values`);
* `adapter_batch(model, names)` runs one forward in which row i uses adapter names[i] (PEFT's
  mixed-batch inference; "__base__" is the frozen model).

Everything that reads "the adapter" (save_lora, to_peft, merge_lora, mark_only_lora_as_trainable...)
reads the active one; `active_parameters` maps the active adapter's tensors to the names a
single-adapter model would give them, so files stay one format.

Covers: the model-level API above, `disable_adapters` (the frozen model for a block), `active_parameters`,
`adapter_values` and `loading_into` (what the loaders call to load by name). Not here: the per-layer
mechanism and `AdapterHeads` (`loralib.layers.slots`), the file formats (`loralib.adapters`,
`loralib.peft_interop`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loralib.checks import check_module, check_names
from loralib.config import LoraConfig, config_from
from loralib.injection import (
    HEAD_NAMES,
    _name_matches,
    _set_module,
    find_targets,
    inject_lora,
    inject_settings,
    lora_layers,
)
from loralib.layers import LORA_TENSORS, LoraLayer
from loralib.layers.slots import BASE_ROWS, DEFAULT_ADAPTER, AdapterHeads, check_adapter_name

__all__ = [
    "AdapterHeads",
    "adapter_values",
    "active_adapter",
    "active_parameters",
    "adapter_batch",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "set_adapter",
    "using_adapter",
]


class _Groups:
    """The rows of a mixed batch by adapter, with index tensors made once per device."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        order: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            order.setdefault(n, []).append(i)
        self.order = order
        self._index: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def rows(self, n: int, device: torch.device, where: nn.Module) -> list[tuple[str, torch.Tensor]]:
        if n != len(self.names):
            raise ValueError(
                f"adapter_names has {len(self.names)} entries but a {type(where).__name__} received a batch of {n} "
                "rows; give one adapter name per row (the batch's first dimension)."
            )
        if device not in self._index:
            self._index[device] = [
                (name, torch.tensor(idx, device=device)) for name, idx in self.order.items()
            ]
        return self._index[device]


# -- what a model holds ------------------------------------------------------------------------------


def _all_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer, whether or not it holds the active adapter."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _heads(model: nn.Module) -> list[tuple[str, AdapterHeads]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterHeads)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter the model holds (layers or heads), in the order they were added."""
    check_module(model)
    names: dict[str, None] = {}
    for _, layer in _all_layers(model):
        names.update(dict.fromkeys(layer.adapter_names()))
    for _, h in _heads(model):
        names.update(dict.fromkeys(h.heads.keys()))
    return list(names)


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with."""
    check_module(model)
    for _, layer in _all_layers(model):
        return layer.active_adapter
    raise ValueError("the model has no LoRA layers; call inject_lora or add_adapter first.")


def _values(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {adapter (or "__base__"): value}} of the shared tensors adapters carry their own of."""
    return model.__dict__.setdefault("_lora_adapter_values", {})


def adapter_values(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Keep `tensors` (names of shared, non-LoRA parameters: biases, layer norms) as adapter
    `adapter_name`'s own values: copied into the parameters whenever it is active. An adapter without its
    own value of a parameter computes with the value the parameter had before any adapter carried one."""
    params = dict(model.named_parameters())
    values = _values(model)
    active = active_adapter(model)
    for name, value in tensors.items():
        p = params[name]
        slot = values.setdefault(name, {BASE_ROWS: p.detach().clone()})
        slot[adapter_name] = value.detach().to(device=p.device, dtype=p.dtype).clone()
        if adapter_name == active:
            with torch.no_grad():
                p.copy_(slot[adapter_name])


def _swap_values(model: nn.Module, old: str, new: str) -> None:
    values = _values(model)
    if not values:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, slot in values.items():
            if old in slot:  # what training of the old adapter changed stays its own
                slot[old] = params[name].detach().clone()
            params[name].copy_(slot.get(new, slot[BASE_ROWS]))


# -- adding, switching, deleting ---------------------------------------------------------------------


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the adapter every layer and head computes with; returns the model.

    Merged layers stay merged: each takes the old update out and puts the new one in (milliseconds),
    so a merged model switches tasks at the frozen model's inference cost. A layer that lacks the
    adapter (it targeted other modules) computes its frozen module.
    """
    check_module(model)
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(
            f"the model has no adapter {adapter_name!r}; it has {names}. add_adapter or load one first."
        )
    merged = _route_all(model, active_adapter(model), adapter_name)
    for _, layer in _all_layers(model):
        if merged and layer.has_adapter:
            layer.merge()
    return model


def _route_all(model: nn.Module, old: str, new: str) -> list[LoraLayer]:
    """Point every layer, head and carried value from adapter `old` to `new` (BASE_ROWS: the frozen
    model), unmerging merged layers first; return the layers that were merged."""
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    for _, layer in _all_layers(model):
        layer._route(new)
    for _, h in _heads(model):
        h.active = new
    _swap_values(model, old, new)
    return merged


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """Compute with `adapter_name` for the block, then with the adapter active before."""
    before = active_adapter(model)
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_adapter(model, before)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Compute the frozen model in the block (PEFT's `disable_adapter()`): no layer adds an update, each
    head is its original, carried values are the base's; merged layers are unmerged for the block and
    merged again after."""
    check_module(model)
    active = active_adapter(model)
    merged = _route_all(model, active, BASE_ROWS)
    try:
        yield model
    finally:
        _route_all(model, BASE_ROWS, active)
        for layer in merged:
            layer.merge()


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    config: LoraConfig | None = None,
    *,
    autocast_adapter_dtype: bool = True,
    **fields: Any,
) -> list[str]:
    """Add adapter `adapter_name` to the modules `config` targets (PEFT's `add_adapter`); return their names.

    A target that already carries LoRA gets a further adapter, any other target a LoRA layer; each starts
    as the frozen module (B = 0). `modules_to_save` (e.g. ["classifier"]) gets a copy of the head for this
    adapter. On a model without LoRA this is `inject_lora` naming the adapter. The active adapter does not
    change: `set_adapter(model, adapter_name)` before training it. A failure leaves the model as it was.
    """
    check_module(model)
    check_adapter_name(adapter_name)
    config = config_from(config, **fields)
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"the model already has an adapter {adapter_name!r}; delete_adapter it first or pick another name."
        )
    if config.bias != "none":
        raise ValueError(
            f"add_adapter with bias={config.bias!r}: a trained bias is shared by every adapter unless each keeps "
            "its own values; train with bias='none', or load a saved adapter (load_lora(..., adapter_name=...)) "
            "whose biases are then kept per adapter."
        )
    layers = _all_layers(model)
    if not layers:
        names = inject_lora(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
        for _, layer in _all_layers(model):
            layer.rename_first_adapter(adapter_name)
        _add_heads(model, adapter_name, config.modules_to_save or (), first=True)
        return names
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of this model.")
    done = _add_to_layers(
        model, adapter_name, {n: config.settings_for(n) for n in targets}, autocast_adapter_dtype
    )
    try:
        _add_heads(model, adapter_name, config.modules_to_save or (), first=False)
    except BaseException:
        _undo_layers(model, adapter_name, *done)
        raise
    return targets


def _add_to_layers(
    model: nn.Module, adapter_name: str, settings_of: dict[str, Any], autocast_adapter_dtype: bool
) -> tuple[list[LoraLayer], list[tuple[str, nn.Module]]]:
    """Give each module of `settings_of` ({full name: LoraSettings}) adapter `adapter_name`: a further
    adapter in a LoRA layer, or a new LoRA layer (through `inject_settings`, so with inject_lora's checks)
    whose first adapter it is, routed to the active adapter. Returns (layers added to, (name, module
    replaced)) for `_undo_layers`; a failure half-way undoes what it did before raising."""
    active = active_adapter(model)
    modules = dict(model.named_modules())
    added: list[LoraLayer] = []
    injected: list[tuple[str, nn.Module]] = []
    try:
        for name, settings in settings_of.items():
            module = modules.get(name)
            if isinstance(module, LoraLayer):
                module.add_adapter(adapter_name, settings, autocast_adapter_dtype)
                added.append(module)
            else:
                inject_settings(model, name, settings, autocast_adapter_dtype)
                layer = model.get_submodule(name)
                layer.rename_first_adapter(adapter_name)
                layer._route(active)
                injected.append((name, module))
    except BaseException:
        _undo_layers(model, adapter_name, added, injected)
        raise
    return added, injected


def _undo_layers(
    model: nn.Module, adapter_name: str, added: list[LoraLayer], injected: list[tuple[str, nn.Module]]
) -> None:
    """Take back what `_add_to_layers` did."""
    for layer in added:
        if adapter_name in layer.adapter_names():
            layer.delete_adapter(adapter_name)
    for name, module in injected:
        _set_module(model, name, module)


def _wrap_head(model: nn.Module, name: str) -> nn.Module | None:
    """Make module `name` an `AdapterHeads` whose first adapter's head is the module trained so far and
    whose original is a copy of it; return the module it replaced (None if it was one already)."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterHeads):
        return None
    holder = AdapterHeads(copy.deepcopy(module), {_first_name(model): module})
    holder.active = active_adapter(model)
    _set_module(model, name, holder)
    return module


def _add_heads(model: nn.Module, adapter_name: str, modules_to_save: Sequence[str], first: bool) -> None:
    to_save = check_names(modules_to_save, "modules_to_save")
    inside = tuple(f"{n}." for n, _ in _heads(model))
    matched = [
        (n, m)
        for n, m in model.named_modules()
        if n and any(_name_matches(n, [t]) for t in to_save) and not n.startswith(inside)
    ]
    if to_save and not matched:
        raise ValueError(f"modules_to_save {list(to_save)} matches no module of this model.")
    for name, module in matched:
        if isinstance(module, AdapterHeads):
            if adapter_name not in module.heads:
                module.heads[adapter_name] = copy.deepcopy(module.original)
            continue
        if first:
            continue  # the model's own head is the first adapter's; it is wrapped when a second one arrives
        _wrap_head(model, name)
        model.get_submodule(name).heads[adapter_name] = copy.deepcopy(module)


def _first_name(model: nn.Module) -> str:
    names = adapter_names(model)
    return names[0] if names else DEFAULT_ADAPTER


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter `adapter_name` (not the active one) from every layer and head; a layer left without
    adapters becomes its plain module again. Returns the model."""
    check_module(model)
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {names}.")
    if adapter_name == active_adapter(model):
        raise ValueError(
            f"adapter {adapter_name!r} is active; set_adapter(model, <another>) before deleting it."
        )
    for name, layer in _all_layers(model):
        if adapter_name not in layer.adapter_names():
            continue
        if len(layer.adapter_names()) == 1:  # it is absent from the active adapter, so unmerged
            _set_module(model, name, layer.to_base())
        else:
            layer.delete_adapter(adapter_name)
    for name, h in _heads(model):
        if adapter_name in h.heads:
            del h.heads[adapter_name]
        if not len(h.heads):
            _set_module(model, name, h.original)
    for slot in _values(model).values():
        slot.pop(adapter_name, None)
    return model


def add_weighted_adapter(
    model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> nn.Module:
    """A new adapter whose update is sum_i weights[i] * update_i, exactly (PEFT's combination_type="cat").

    In each layer the factors are stacked: A = [w_i s_i A_i], B = [B_i], of rank sum r_i, scaling 1, so
    merging it and unmerging it again is exact. Heads and other carried values are not combined (the new
    adapter computes with each head's `original`). DoRA and lora_bias adapters do not combine linearly and are refused.
    """
    check_module(model)
    check_adapter_name(adapter_name)
    adapters = list(check_names(adapters, "adapters", allow_empty=False))
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(
            f"weights has {len(weights)} entries for {len(adapters)} adapters; give one weight each."
        )
    names = adapter_names(model)
    unknown = [a for a in adapters if a not in names]
    if unknown:
        raise ValueError(f"adapters {unknown} are not in the model (it has {names}).")
    if adapter_name in names:
        raise ValueError(f"the model already has an adapter {adapter_name!r}.")
    from loralib.config import LoraSettings

    plans = []
    for name, layer in _all_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
        if not present:
            continue
        a_parts, b_parts = [], []
        for a, w in present:
            with layer.using_adapter(a):
                if layer.use_dora or layer.lora_B_bias is not None:
                    raise ValueError(
                        f"{name}: adapter {a!r} is DoRA or has lora_bias; its update is not linear in B A."
                    )
                a_parts.append(layer.lora_A.detach() * (w * layer.scaling))
                b_parts.append(layer.lora_B.detach())
        plans.append((layer, torch.cat(a_parts, 0), torch.cat(b_parts, 1)))
    for layer, a, b in plans:
        r = a.shape[0]
        layer.add_adapter(adapter_name, LoraSettings(r=r, lora_alpha=float(r)), autocast_adapter_dtype=True)
        with layer.using_adapter(adapter_name), torch.no_grad():
            layer.lora_A.copy_(a.reshape(layer.lora_A.shape))
            layer.lora_B.copy_(b.reshape(layer.lora_B.shape))
    return model


# -- a batch whose rows use different adapters -------------------------------------------------------


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names_: Sequence[str]) -> Iterator[nn.Module]:
    """Forwards in this block compute row i of the batch with adapter adapter_names_[i] ("__base__": the
    frozen model), as PEFT's `model(..., adapter_names=[...])`. Each LoRA Linear computes the frozen
    product once for the whole batch and adds each group's low-rank term; heads run per group.

    Needs unmerged layers, and adapters that carry no shared values of their own (per-adapter biases or
    norms cannot differ within one forward: serve those with set_adapter).
    """
    check_module(model)
    rows = list(check_names(adapter_names_, "adapter_names", allow_empty=False))
    known = set(adapter_names(model)) | {BASE_ROWS}
    unknown = sorted(set(rows) - known)
    if unknown:
        raise ValueError(
            f"adapter_names has {unknown}, which the model does not hold (it has {sorted(known)})."
        )
    carried = sorted({a for slot in _values(model).values() for a in slot if a in set(rows)})
    if carried:
        raise ValueError(
            f"adapters {carried} carry their own biases or norms (shared parameters), which one forward cannot "
            "vary by row; serve them one at a time with set_adapter."
        )
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(
            f"LoRA layers {merged[:3]} are merged; call unmerge_lora(model) before a mixed batch."
        )
    groups = _Groups(rows)
    holders = [m for _, m in _all_layers(model)] + [h for _, h in _heads(model)]
    for m in holders:
        m.__dict__["_lora_batch"] = groups
    try:
        yield model
    finally:
        for m in holders:
            m.__dict__.pop("_lora_batch", None)


# -- the active adapter's tensors under single-adapter names -----------------------------------------


def active_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the model as a single-adapter model with the active adapter would name them:
    each LoRA layer's `<layer>.lora_A` ... is the active adapter's, each `AdapterHeads` reads as its active
    head, and the other adapters' tensors are left out. What save_lora and the loaders read and write."""
    check_module(model)
    lora = {n: layer for n, layer in _all_layers(model)}
    heads = {n: h for n, h in _heads(model)}
    hidden = tuple(f"{n}.lora_adapters." if n else "lora_adapters." for n in lora) + tuple(
        f"{n}.{part}." for n in heads for part in ("heads", "original")
    )
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if name.startswith(hidden):
            continue
        if owner in lora and leaf in LORA_TENSORS:
            continue
        out[name] = p
    for name, layer in lora.items():
        if not layer.has_adapter:
            continue
        prefix = f"{name}." if name else ""
        for t in LORA_TENSORS:
            value = getattr(layer, t, None)
            if isinstance(value, nn.Parameter):
                out[prefix + t] = value
    for name, h in heads.items():
        for sub, p in h.head().named_parameters():
            out[f"{name}.{sub}"] = p
    return out


# -- loading into a named adapter (used by loralib.adapters and loralib.peft_interop) -----------------


def _fit(module: nn.Module, tensors: dict[str, torch.Tensor]) -> list:
    """Give `module`'s parameters the shapes of `tensors` ({name inside module: tensor}): a head copy for
    a task with another number of labels (an nn.Linear's in/out_features follow its weight). Returns
    what `_unfit` needs to put the old parameters back."""
    undo = []
    for sub, value in tensors.items():
        owner_name, _, leaf = sub.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        p = getattr(owner, leaf, None)
        if isinstance(p, nn.Parameter) and tuple(p.shape) != tuple(value.shape):
            undo.append(
                (owner, leaf, p, getattr(owner, "out_features", None), getattr(owner, "in_features", None))
            )
            setattr(owner, leaf, nn.Parameter(p.new_empty(value.shape), requires_grad=p.requires_grad))
            if isinstance(owner, nn.Linear) and leaf == "weight":
                owner.out_features, owner.in_features = value.shape
    return undo


def _unfit(undo: list) -> None:
    for owner, leaf, p, out_features, in_features in reversed(undo):
        setattr(owner, leaf, p)
        if isinstance(owner, nn.Linear) and leaf == "weight":
            owner.out_features, owner.in_features = out_features, in_features


def _under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n[len(prefix) + 1 :]: v for n, v in tensors.items() if n.startswith(prefix + ".")}


@contextlib.contextmanager
def loading_into(
    model: nn.Module,
    adapter_name: str,
    layers: dict[str, Any],
    others: dict[str, torch.Tensor],
    heads: Sequence[str],
    autocast_adapter_dtype: bool = True,
) -> Iterator[None]:
    """Prepare adapter `adapter_name` for a loader, run the loader's block with it active, and undo the
    preparation if the block fails.

    layers: {module name: LoraSettings} the adapter adapts; others: its non-LoRA tensors in single-adapter
    names; heads: top-level module names whose tensors make a head copy of this adapter. With no LoRA in
    the model the block injects as usual and its layers' first adapter is then named `adapter_name`.
    """
    check_adapter_name(adapter_name)
    fresh = not _all_layers(model)
    head_tensors = {n: v for n, v in others.items() if n.split(".")[0] in heads}
    values = {n: v for n, v in others.items() if n not in head_tensors}
    exists = not fresh and adapter_name in adapter_names(model)
    if fresh:
        wrapped = []
        for h in heads:  # the model's own head stays the original; the adapter gets a copy of its shape
            module = model.get_submodule(h)
            holder = AdapterHeads(module, {adapter_name: copy.deepcopy(module)})
            holder.active = adapter_name
            _fit(holder.heads[adapter_name], _under(h, head_tensors))
            _set_module(model, h, holder)
            wrapped.append((h, module))
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in values if n in params}
        try:
            yield
        except BaseException:
            for h, module in wrapped:
                _set_module(model, h, module)
            raise
        for h, _ in wrapped:
            model.get_submodule(h).active = adapter_name
        for _, layer in _all_layers(model):
            layer.rename_first_adapter(adapter_name)
        params = dict(model.named_parameters())
        slots = _values(model)
        for n, b in base.items():  # the values before this adapter, and its own (the loader copied them in)
            slots[n] = {BASE_ROWS: b, adapter_name: params[n].detach().clone()}
        return
    done: tuple[list, list] = ([], [])
    wrapped: list[tuple[str, nn.Module]] = []
    try:
        if not exists:
            done = _add_to_layers(model, adapter_name, layers, autocast_adapter_dtype)
        for h in heads:
            replaced = _wrap_head(model, h)  # the module so far served the model's adapters
            if replaced is not None:
                wrapped.append((h, replaced))
            module = model.get_submodule(h)
            if adapter_name not in module.heads:
                module.heads[adapter_name] = copy.deepcopy(module.original)
            _fit(module.heads[adapter_name], _under(h, head_tensors))
        with using_adapter(model, adapter_name):
            if values:
                adapter_values(model, adapter_name, values)
            yield
    except BaseException:
        if not exists:
            _undo_layers(model, adapter_name, *done)
            for _, h in _heads(model):
                if adapter_name in h.heads:
                    del h.heads[adapter_name]
            for slot in _values(model).values():
                slot.pop(adapter_name, None)
        for h, module in wrapped:
            _set_module(model, h, module)
        raise


def head_modules(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The task heads (`loralib.injection.HEAD_NAMES`, top-level, without LoRA inside) that `tensors`
    (single-adapter names) hold weights of: what a named adapter keeps its own copy of."""
    tops = dict(model.named_children())
    found = {n.split(".")[0] for n in tensors}
    return sorted(
        h
        for h in found & set(HEAD_NAMES)
        if h in tops
        and (
            isinstance(tops[h], AdapterHeads) or not any(isinstance(m, LoraLayer) for m in tops[h].modules())
        )
    )


def carried_names(model: nn.Module) -> set[str]:
    """Names (single-adapter form) of what the active adapter carries besides LoRA: its head copy's
    parameters and its own values of shared tensors. `save_lora` writes them whether or not they train."""
    if not _all_layers(model):
        return set()
    active = active_adapter(model)
    out = {n for n, slot in _values(model).items() if active in slot}
    for name, h in _heads(model):
        out.update(f"{name}.{sub}" for sub, _ in h.head().named_parameters())
    return out
