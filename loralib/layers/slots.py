"""Named adapters inside one LoRA layer: several updates beside one frozen weight, one of them active.

A layer's first adapter lives on the layer itself (`lora_A`, `lora_B`, ... under the names a
single-adapter layer has always had, so its state dict and files do not change). Every further adapter
is a `LoraAdapter` in the layer's `lora_adapters` dict (state-dict keys `lora_adapters.<name>.lora_A`).
The attributes in `PER_ADAPTER` are `Routed` descriptors: `layer.lora_A`, `layer.r`, `layer.scaling`,
... read and write the *active* adapter's, so the forward, merge, DoRA and every saver see one adapter
at a time and stay as they were; the single-adapter fast path does exactly what it did.

A layer whose active adapter is not one of its own (another adapter targeted other modules) computes
the frozen module alone (`has_adapter` is False, so `lora_layers` skips it). During a mixed batch
(`loralib.named.adapter_batch`) the layer computes each row with that row's adapter (`mixed_forward`).

Covers: `Routed`, `LoraAdapter`, the layer methods `add_adapter`, `set_adapter`, `delete_adapter`,
`using_adapter`, `adapter_names`, `active_adapter`, `mixed_forward`, and `AdapterHeads` (a task head
copied per adapter, PEFT's modules_to_save wrapper). Not here: the model-level API, loading by name and
mixed-batch set-up (`loralib.named`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# The attributes each adapter has its own of; everything else (weight, bias, merged...) is the layer's.
PER_ADAPTER = (
    "lora_A",
    "lora_B",
    "lora_B_bias",
    "lora_magnitude_vector",
    "lora_dropout",
    "_r",
    "_lora_alpha",
    "_use_rslora",
    "init",
    "_lora_dropout_p",
    "_dora_merged_norm",
)
DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter
BASE_ROWS = "__base__"  # PEFT's name, in a mixed batch, for rows that take no adapter
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def check_adapter_name(name: object, argument: str = "adapter_name") -> str:
    """`name` if it can name an adapter (a module key: no dots), else a ValueError naming the argument."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE_ROWS:
        raise ValueError(
            f"{argument} must be a name of letters, digits, '_' or '-' starting with a letter (not {BASE_ROWS!r}), "
            f"got {name!r}; e.g. 'sst2'."
        )
    return name


class Routed:
    """A per-adapter attribute of a LoRA layer: reads and writes go to the active adapter.

    The first adapter's value is stored on the layer itself (a registered parameter or submodule, or a
    plain attribute), so nothing changes for a layer with one adapter.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        d = obj.__dict__
        other = d.get("_lora_slot")
        if other is not None:
            return getattr(other, self.name)
        name = self.name
        if (
            name in d
        ):  # a plain value (r, alpha...): never also a parameter or module (nn.Module keeps them apart)
            return d[name]
        params = d.get("_parameters")
        if params is not None and name in params:
            return params[name]
        modules = d.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        raise AttributeError(f"{type(obj).__name__} has no {name!r}")

    def __set__(self, obj, value) -> None:
        # nn.Module.__setattr__ registers Parameters and Modules on the layer itself before this runs; a
        # plain value (a float, None for an unregistered name) lands here.
        other = obj.__dict__.get("_lora_slot")
        if other is not None:
            setattr(other, self.name, value)
        else:
            obj.__dict__[self.name] = value


class LoraAdapter(nn.Module):
    """A further named adapter of a LoRA layer: the same tensors and settings as the layer's first one
    (lora_A, lora_B, lora_B_bias, lora_magnitude_vector, lora_dropout, r, alpha, rsLoRA, init)."""

    def extra_repr(self) -> str:
        return f"r={self._r}, lora_alpha={self._lora_alpha:g}" + (
            ", use_dora=True" if self.lora_magnitude_vector is not None else ""
        )


class NamedAdapters:
    """The layer methods for several adapters (mixed into `LoraLayer`)."""

    supports_named_adapters: bool = True

    # -- names ---------------------------------------------------------------------------------------

    @property
    def adapter_name(self) -> str:
        """The name of the layer's first adapter (the one stored on the layer itself)."""
        return self.__dict__.get("_lora_own_name", DEFAULT_ADAPTER)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, the first one first."""
        bank = self._modules.get("lora_adapters")
        return [self.adapter_name, *(bank.keys() if bank is not None else ())]

    @property
    def active_adapter(self) -> str:
        """The adapter the layer computes with (it may hold none of that name: then it is the frozen module)."""
        return self.__dict__.get("_lora_active_name", self.adapter_name)

    @property
    def has_adapter(self) -> bool:
        """True when the active adapter is one of this layer's (a layer without it is the frozen module)."""
        return not self.__dict__.get("_lora_absent", False)

    def _slot(self, name: str):
        """The object holding adapter `name`'s attributes: None for the first (the layer), else its record."""
        if name == self.adapter_name:
            return None
        bank = self._modules.get("lora_adapters")
        if bank is None or name not in bank:
            raise KeyError(name)
        return bank[name]

    def _route(self, name: str) -> None:
        """Point the per-adapter attributes at adapter `name` (absent from this layer: the frozen module)."""
        d = self.__dict__
        d["_lora_active_name"] = name
        try:
            d["_lora_slot"] = self._slot(name)
            d["_lora_absent"] = False
        except KeyError:
            d["_lora_slot"] = None
            d["_lora_absent"] = True

    # -- adding, switching, deleting -----------------------------------------------------------------

    def add_adapter(self, name: str, settings, autocast_adapter_dtype: bool = True) -> None:
        """Add adapter `name` with validated `settings` (`loralib.config.LoraSettings`), initialised as the
        first one was (B = 0: it starts as the frozen module). The active adapter does not change."""
        from loralib.layers.base import adapter_dtype  # the base imports this module

        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(
                f"this layer already has an adapter named {name!r}; delete_adapter({name!r}) first."
            )
        if not self.supports_named_adapters:
            raise ValueError(
                f"{type(self).__name__} holds one adapter only (Microsoft's layers); use LoraLinear & co."
            )
        record = LoraAdapter()
        w = self.weight
        self._init_lora(
            settings,
            self.adapter_shapes(self, settings.r),
            w.device,
            adapter_dtype(w.dtype, autocast_adapter_dtype),
            into=record,
        )
        if "lora_adapters" not in self._modules:
            self.add_module("lora_adapters", nn.ModuleDict())
        self._modules["lora_adapters"][name] = record
        if w.device.type != "meta":
            with self.using_adapter(name):
                self._reset_all()

    @contextlib.contextmanager
    def using_adapter(self, name: str) -> Iterator[None]:
        """Route to adapter `name` for the block (no merge bookkeeping: for unmerged layers and reads)."""
        before = self.active_adapter
        self._route(name)
        try:
            yield
        finally:
            self._route(before)

    def set_adapter(self, name: str) -> None:
        """Compute with adapter `name` from now on. A merged layer takes the old update out of its weight
        and puts the new one in (a layer without `name` then computes the frozen module, unmerged)."""
        if name == self.active_adapter:
            return
        merged = self.merged
        if merged:
            self.unmerge()
        self._route(name)
        if merged and self.has_adapter:
            self.merge()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (not the active one). Deleting the first adapter makes the next one first."""
        if name not in self.adapter_names():
            raise ValueError(f"this layer has no adapter {name!r}; it has {self.adapter_names()}.")
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set_adapter(<another>) before deleting it.")
        if len(self.adapter_names()) == 1:
            raise ValueError(f"{name!r} is this layer's only adapter; unload_lora removes the layer's LoRA.")
        bank = self._modules["lora_adapters"]
        if name != self.adapter_name:
            del bank[name]
        else:  # promote the next adapter onto the layer itself
            successor = next(iter(bank.keys()))
            record = bank[successor]
            for attr in PER_ADAPTER:
                self._set_own(attr, getattr(record, attr))
            del bank[successor]
            self.__dict__["_lora_own_name"] = successor
        if not len(bank):
            del self._modules["lora_adapters"]
        self._route(self.active_adapter)

    def _set_own(self, attr: str, value) -> None:
        """Store `value` as the first adapter's `attr`, registered as what it is (parameter, module, value)."""
        for store in (self._parameters, self._modules, self.__dict__):
            store.pop(attr, None)
        if isinstance(value, nn.Parameter):
            self._parameters[attr] = value
        elif isinstance(value, nn.Module):
            self._modules[attr] = value
        else:
            self.__dict__[attr] = value

    def rename_first_adapter(self, name: str) -> None:
        """Name the layer's first adapter (before any other is added; inject_lora names it)."""
        check_adapter_name(name)
        if len(self.adapter_names()) > 1:
            raise ValueError("the first adapter can only be renamed while it is the layer's only one.")
        active = self.active_adapter == self.adapter_name
        self.__dict__["_lora_own_name"] = name
        if active:
            self._route(name)

    # -- a mixed batch: each row with its own adapter --------------------------------------------------

    def mixed_forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        """The output for a batch whose row i takes adapter `groups.names[i]` (`loralib.named.adapter_batch`).

        A Linear adds each group's low-rank term to one frozen product of the whole batch; other layer
        types (and DoRA or lora_bias adapters) run each group through the layer's own forward.
        """
        if self.merged:
            raise ValueError(
                "a mixed batch needs unmerged LoRA layers (a merged weight holds one adapter's update); "
                "call loralib.unmerge_lora(model) first."
            )
        rows = groups.rows(x.shape[0], x.device, self)
        before = self.active_adapter
        self.__dict__["_lora_batch"] = None  # the groups' own forwards are ordinary ones
        try:
            out = self._mixed_shared(x, rows)
            if out is not None:
                return out
            outs = []
            for name, index in rows:
                self._route(name)  # forward's own detour computes the frozen module where it is absent
                outs.append(self.forward(x.index_select(0, index)))
        finally:
            self._route(before)
            self.__dict__["_lora_batch"] = groups
        return stitch_rows(x.shape[0], rows, outs)

    def _mixed_shared(self, x: torch.Tensor, rows) -> torch.Tensor | None:
        """A layer type's mixed batch that shares the frozen product over all rows, or None: then each
        group runs through the layer's own forward (`LoraLinear` overrides it)."""
        return None

    def _detour(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output when this call is not the active adapter's ordinary forward, else None: a mixed
        batch, or an active adapter this layer does not hold (the frozen module computes)."""
        d = self.__dict__
        groups = d.get("_lora_batch")
        if groups is not None:
            return self.mixed_forward(x, groups)
        if d.get("_lora_absent", False):
            return self.base_type.forward(self, x)
        return None


def stitch_rows(n: int, rows, outs: list[torch.Tensor]) -> torch.Tensor:
    """One (n, ...) output from each group's rows (`rows`: [(name, index)]) and outputs, in batch order."""
    out = outs[0].new_empty((n, *outs[0].shape[1:]))
    for (_, index), y in zip(rows, outs):
        out.index_copy_(0, index, y)
    return out


class AdapterHeads(nn.Module):
    """A module of `modules_to_save` with one copy per adapter (PEFT's ModulesToSaveWrapper).

    heads[name] is adapter `name`'s head; `original` is the module as it was when it was wrapped, which
    an adapter without its own head (and a mixed batch's "__base__" rows) computes with. Copies may differ
    in shape from it (another num_labels).
    """

    def __init__(self, original: nn.Module, heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        from loralib.layers.base import LoraLayer  # the base imports this module

        if any(isinstance(m, LoraLayer) for m in original.modules()):
            raise ValueError("a task head that carries LoRA layers cannot also be copied per adapter.")
        self.original = original
        self.heads = nn.ModuleDict(heads or {})
        self.active = DEFAULT_ADAPTER
        self.training = original.training

    def head(self, name: str | None = None) -> nn.Module:
        """Adapter `name`'s head (default: the active adapter's); `original` for one without its own."""
        name = self.active if name is None else name
        return self.heads[name] if name in self.heads else self.original

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        groups = self.__dict__.get("_lora_batch")
        if groups is None:
            return self.head()(x, *args, **kwargs)
        rows = groups.rows(x.shape[0], x.device, self)
        outs = [self.head(name)(x.index_select(0, index), *args, **kwargs) for name, index in rows]
        shapes = {tuple(o.shape[1:]) for o in outs}
        if len(shapes) > 1:
            raise ValueError(
                f"the adapters of this mixed batch have heads of different output shapes {sorted(shapes)} "
                f"({[n for n, _ in rows]}); a batch mixes adapters whose heads agree, e.g. tasks with the same "
                "number of labels. Serve the others with set_adapter."
            )
        return stitch_rows(x.shape[0], rows, outs)
