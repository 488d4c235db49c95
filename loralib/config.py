"""`LoraConfig`: every LoRA hyper-parameter in one validated place, with PEFT's names and defaults.

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_lora(model, config)                      # or inject_lora(model, ["query", "value"], r=16, ...)
    LoraConfig.from_dict(json.load(open("adapter_config.json")))   # a PEFT adapter's config
    config.to_dict()                                # what PEFT's LoraConfig(**d) reads back

A config is frozen and validated once, where it is made (`dataclasses.replace` makes and validates a new
one); everything downstream (the CLI, `TrainConfig`, `inject_lora`, the layers, the adapter file) takes
its values as they are. `LoraSettings` is what one layer needs (r, lora_alpha, lora_dropout, use_rslora,
init, lora_bias, use_dora): `LoraConfig.settings_for(name)` resolves rank_pattern / alpha_pattern for a module, and
a layer built directly (`LoraLinear(768, 768, r=16)`) validates its own arguments into one.

The defaults are PEFT's: r=8, lora_alpha=8 (scaling lora_alpha / r = 1 at r=8; at r=16 it is 0.5, as in
PEFT), lora_dropout=0. lora_alpha=None is loralib's shorthand for lora_alpha = r (scaling 1 at any rank),
resolved per layer in `settings_for` and written to PEFT's JSON as numbers.

Covers: the two dataclasses, PEFT's matching rules for target_modules / exclude_modules /
layers_to_transform / rank_pattern (`targets`, `pattern_key`), and the PEFT-config fields loralib refuses
(`UNSUPPORTED_PEFT`). Not here: finding modules in a model (`loralib.injection`), the layers
(`loralib.layers`), reading and writing adapter files (`loralib.adapters`, `loralib.peft_interop`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loralib.checks import check_alpha, check_bool, check_choice, check_dropout, check_int, check_rank

BIAS_CHOICES = ("none", "all", "lora_only")
# init_lora_weights: True is PEFT's default (A kaiming-uniform, B zero); "gaussian" (A ~ N(0, 1/r^2));
# False keeps both factors random (B too: the layer does not start as the base; PEFT's test setting);
# "article" (A ~ N(0, 1), the seed article's) is loralib's own.
INIT_LORA_WEIGHTS = (True, False, "gaussian", "article")
# The layer-level spelling of init_lora_weights (stored in loralib's adapter files).
INIT_NAMES = {True: "kaiming", False: "random", "gaussian": "gaussian", "article": "article"}
INITS = tuple(INIT_NAMES.values())
INIT_VALUES = {name: value for value, name in INIT_NAMES.items()}  # "kaiming" -> True
# PEFT initialisations that change the base weights or train differently from plain LoRA: loading or
# training them as plain LoRA would be wrong, so they are refused by name.
REFUSED_INITS = ("pissa", "olora", "loftq", "eva", "corda", "orthogonal", "lora_ga")

# PEFT LoraConfig fields loralib does not reproduce, with the feature's name, refused unless at PEFT's
# default (the value that switches the feature off).
UNSUPPORTED_PEFT: dict[str, tuple[str, Any]] = {
    "use_qalora": ("QA-LoRA", False),
    "target_parameters": ("LoRA on nn.Parameter targets (target_parameters)", None),
    "trainable_token_indices": ("trainable tokens", None),
    "layer_replication": ("layer replication", None),
    "megatron_config": ("Megatron parallel layers", None),
    "loftq_config": ("LoftQ initialisation", {}),
    "eva_config": ("EVA initialisation", None),
    "corda_config": ("CorDA initialisation", None),
    "lora_ga_config": ("LoRA-GA initialisation", None),
    "velora_config": ("VeLoRA", None),
    "alora_invocation_tokens": ("activated LoRA (aLoRA)", None),
    "monteclora_config": ("MonteCLoRA", None),
    "arrow_config": ("Arrow routing", None),
    "kasa_config": ("KaSA", None),
    "use_bdlora": ("block-diagonal LoRA", None),
}
# PEFT config entries that describe the file or PEFT's runtime, not the adapter's function.
PEFT_METADATA = (
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
)


def _names(value: Any, name: str, allow_str: bool, as_set: bool = False) -> str | tuple[str, ...] | None:
    """None, a regex string (when allow_str) or a non-empty tuple of non-empty module names (sorted when
    `as_set`: PEFT keeps target_modules and exclude_modules as sets, so their order means nothing)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            raise TypeError(
                f"{name} must be a list of module names, got the string {value!r}; write [{value!r}]."
            )
        if not value:
            raise ValueError(f"{name} must not be an empty string; give module names or a regex.")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {e}") from None
        return value
    if isinstance(value, Mapping) or not isinstance(value, (Sequence, set, frozenset)):
        raise TypeError(
            f"{name} must be a list of module names{' or a regex' if allow_str else ''}, got {value!r}."
        )
    items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    bad = [v for v in items if not isinstance(v, str) or not v]
    if bad or not items:
        raise ValueError(f"{name} must be non-empty module names, got {value!r}.")
    return tuple(sorted(set(items))) if as_set else tuple(dict.fromkeys(items))


def _pattern(value: Any, name: str, check) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict {{module name or regex: value}}, got {value!r}.")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be module names or regexes, got {key!r}.")
        out[key] = check(v, f"{name}[{key!r}]")
    return out


def check_init(init_lora_weights: Any) -> bool | str:
    """PEFT's init_lora_weights, or loralib's "article"; the PEFT methods loralib lacks are named."""
    if isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(REFUSED_INITS):
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not supported by loralib: that initialisation changes "
            "the base weights or what trains; choose one of True (PEFT's default), False, 'gaussian', 'article'."
        )
    if isinstance(init_lora_weights, bool) or init_lora_weights in INIT_LORA_WEIGHTS[2:]:
        return init_lora_weights
    raise ValueError(
        f"init_lora_weights={init_lora_weights!r} is not one of {INIT_LORA_WEIGHTS}: True (A kaiming, B zero), "
        "False (both random), 'gaussian' (A ~ N(0, 1/r^2)), 'article' (A ~ N(0, 1))."
    )


@dataclass(frozen=True)
class LoraSettings:
    """What one LoRA layer needs, validated when made. `init` is the layer-level name of
    init_lora_weights ("kaiming", "random", "gaussian", "article")."""

    r: int = 8
    lora_alpha: float | None = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    lora_bias: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "r", check_rank(self.r))
        alpha = check_alpha(self.lora_alpha, "lora_alpha")
        set_(self, "lora_alpha", float(self.r if alpha is None else alpha))  # None means lora_alpha = r
        set_(self, "lora_dropout", float(check_dropout(self.lora_dropout, "lora_dropout")))
        check_bool(self.use_rslora, "use_rslora")
        check_bool(self.lora_bias, "lora_bias")
        check_bool(self.use_dora, "use_dora")
        if self.use_dora and self.lora_bias:
            raise ValueError(
                "lora_bias=True is not supported with use_dora=True (PEFT refuses it too); choose one."
            )
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose one of {INITS}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


DEFAULT_SETTINGS = LoraSettings()


def resolve_settings(settings: LoraSettings | None, **kwargs: Any) -> LoraSettings:
    """A layer constructor's settings: the validated `settings` object as given, else its keyword
    arguments validated into one (passing both is an error)."""
    if settings is None:
        return LoraSettings(**kwargs)
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"settings must be a loralib.config.LoraSettings, got {type(settings).__name__}.")
    given = {k: v for k, v in kwargs.items() if v != getattr(DEFAULT_SETTINGS, k)}
    if given:
        raise TypeError(f"pass either settings= or the LoRA arguments {sorted(given)}, not both.")
    return settings


def pattern_key(keys: Sequence[str], name: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of `name` (as a
    regex over whole dotted parts), or None."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA's hyper-parameters with PEFT's names and defaults (see the module docstring)."""

    # One default each: a layer's (`LoraSettings`), which are PEFT's.
    r: int = LoraSettings.r
    lora_alpha: float | None = LoraSettings.lora_alpha
    lora_dropout: float = LoraSettings.lora_dropout
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    bias: str = "none"
    use_rslora: bool = LoraSettings.use_rslora
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    # PEFT's flag for weights stored (in, out); the layout follows the module type here (GPT-2's Conv1D
    # is always fan-in-fan-out, nn.Linear never), as PEFT itself corrects it per layer with a warning.
    fan_in_fan_out: bool = False
    lora_bias: bool = LoraSettings.lora_bias
    # DoRA (weight-decomposed LoRA, `loralib.layers.dora`): a trained magnitude per output feature.
    use_dora: bool = LoraSettings.use_dora

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        base = LoraSettings(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            init=INIT_NAMES[check_init(self.init_lora_weights)],
            lora_bias=self.lora_bias,
            use_dora=self.use_dora,
        )
        set_(self, "r", base.r)
        set_(self, "lora_dropout", base.lora_dropout)
        if self.lora_alpha is not None:
            set_(self, "lora_alpha", base.lora_alpha)
        set_(self, "target_modules", _names(self.target_modules, "target_modules", True, as_set=True))
        set_(self, "exclude_modules", _names(self.exclude_modules, "exclude_modules", True, as_set=True))
        set_(self, "modules_to_save", _names(self.modules_to_save, "modules_to_save", allow_str=False))
        check_choice(self.bias, "bias", BIAS_CHOICES)
        check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        set_(self, "rank_pattern", _pattern(self.rank_pattern, "rank_pattern", check_rank))
        set_(self, "alpha_pattern", _pattern(self.alpha_pattern, "alpha_pattern", check_alpha_value))
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)) or isinstance(layers, str):
                raise TypeError(
                    f"layers_to_transform must be a layer index or a list of them, got {layers!r}."
                )
            if isinstance(layers, int):
                layers = check_int(layers, "layers_to_transform", 0)
            else:
                layers = tuple(check_int(i, "layers_to_transform", 0) for i in layers)
            if isinstance(self.target_modules, str):
                raise ValueError(
                    "layers_to_transform cannot be used with a regex target_modules (PEFT refuses it too): "
                    "put the layer indices into the regex, or give target_modules as a list."
                )
            set_(self, "layers_to_transform", layers)
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError(
                    "layers_pattern only applies with layers_to_transform (PEFT's rule); set both or neither."
                )
            set_(self, "layers_pattern", _names(self.layers_pattern, "layers_pattern", allow_str=True))
        set_(self, "_settings", base)

    # -- per layer -----------------------------------------------------------------------------------

    def settings_for(self, name: str) -> LoraSettings:
        """The layer settings for module `name`: r and lora_alpha from rank_pattern / alpha_pattern where a
        key matches (PEFT's rule), else the top-level values; lora_alpha=None means the layer's r."""
        base: LoraSettings = self._settings  # type: ignore[attr-defined]
        rk = pattern_key(list(self.rank_pattern), name)
        ak = pattern_key(list(self.alpha_pattern), name)
        if rk is None and ak is None and self.lora_alpha is not None:
            return base
        r = self.rank_pattern[rk] if rk is not None else base.r
        alpha = self.alpha_pattern[ak] if ak is not None else (self.lora_alpha or r)
        # Every value was validated when the config was made: build the layer's settings without checking again.
        settings = copy.copy(base)  # a copy skips __post_init__
        object.__setattr__(settings, "r", r)
        object.__setattr__(settings, "lora_alpha", float(alpha))
        return settings

    def targets(self, names: Sequence[str], target_modules: Sequence[str] | None = None) -> list[str]:
        """The names among `names` this config adapts, by PEFT's rules: exclude_modules and modules_to_save
        first, then target_modules (a regex matches the whole name; a list entry matches a name equal to it
        or ending in "." + it), then layers_to_transform (the first number after layers_pattern, or after
        any dotted part). "all-linear" is resolved by `loralib.injection`, which knows the layer types and
        passes the layers' names as `target_modules` (checked names, used instead of the config's)."""
        tm = self.target_modules if target_modules is None else tuple(target_modules)
        return [n for n in names if self._selects(n, tm)]

    def _selects(self, key: str, tm) -> bool:
        ex = self.exclude_modules
        if ex is not None and (
            re.fullmatch(ex, key)
            if isinstance(ex, str)
            else key in ex or any(key.endswith(f".{e}") for e in ex)
        ):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save):
            return False
        if tm is None:
            return False
        if isinstance(tm, str):
            return re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        if not any(key.endswith(f".{t}") for t in tm):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        layers = self.layers_to_transform
        return index == layers if isinstance(layers, int) else index in layers

    # -- PEFT's adapter_config.json --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json fields for this config (PEFT's `LoraConfig(**d)` reads it back).
        lora_alpha=None (= r) is written as numbers: r, and alpha_pattern entries for rank_pattern keys."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["lora_dropout"] = _num(self.lora_dropout)
        d["lora_alpha"] = None if self.lora_alpha is None else _num(self.lora_alpha)
        for key in (
            "target_modules",
            "exclude_modules",
            "modules_to_save",
            "layers_pattern",
            "layers_to_transform",
        ):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = {k: _num(v) for k, v in self.alpha_pattern.items()}
        if self.lora_alpha is None:
            d["lora_alpha"] = self.r
            for key, r in self.rank_pattern.items():
                d["alpha_pattern"].setdefault(key, r)
        return {"peft_type": "LORA", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the config") -> LoraConfig:
        """A config from PEFT's adapter_config.json (or `to_dict`). PEFT features loralib does not reproduce
        are refused by name (`UNSUPPORTED_PEFT`), as are unknown entries that are set: nothing is loaded
        approximately."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{source} must be a dict (PEFT's adapter_config.json), got {type(d).__name__}.")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source} is a {d.get('peft_type')!r} config; loralib reads LoRA configs only.")
        fields = {f.name for f in dataclasses.fields(cls)}
        _refuse_unsupported(d, f"{source} sets ")
        unknown = [
            k
            for k in d
            if k not in fields
            and k not in UNSUPPORTED_PEFT
            and k not in PEFT_METADATA
            and d[k] not in (None, False, {}, [])
        ]
        if unknown:
            raise ValueError(
                f"{source} sets {unknown[:5]}, which loralib does not know; refusing rather than loading the "
                "adapter approximately."
            )
        kwargs = {k: d[k] for k in fields if k in d}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs)


def _refuse_unsupported(values: Mapping[str, Any], where: str = "") -> None:
    """Name the first PEFT feature loralib lacks (`UNSUPPORTED_PEFT`) that `values` switches on."""
    for key, (what, off) in UNSUPPORTED_PEFT.items():
        if key in values and values[key] not in (off, None):
            raise ValueError(f"{where}{key}={values[key]!r}: {what}, which loralib does not implement.")


def _num(x: float) -> int | float:
    """An integral float as an int (PEFT writes lora_alpha 16, not 16.0)."""
    return int(x) if float(x).is_integer() else float(x)


def check_alpha_value(value: Any, name: str) -> float:
    """An alpha_pattern value: a finite number > 0 (None is not a per-layer value)."""
    alpha = check_alpha(value, name)
    if alpha is None:
        raise ValueError(f"{name} must be a number > 0, got None.")
    return alpha


def config_from(config: LoraConfig | str | Sequence[str] | None, **fields: Any) -> LoraConfig:
    """The `LoraConfig` an entry point was given: a config (with `fields` replacing some of its values), PEFT's
    `peft.LoraConfig` (read through `LoraConfig.from_dict`), or target_modules plus keyword fields
    (`inject_lora(model, ["query"], r=4)`)."""
    if not isinstance(config, (LoraConfig, str, Sequence, type(None))) and callable(
        getattr(config, "to_dict", None)
    ):
        config = LoraConfig.from_dict(
            config.to_dict(), source=f"the {type(config).__name__}"
        )  # PEFT's own config
    if isinstance(config, LoraConfig):
        return dataclasses.replace(config, **fields) if fields else config
    if config is not None:
        if "target_modules" in fields:
            raise TypeError("target_modules given twice: positionally and as a keyword.")
        fields["target_modules"] = config
    _refuse_unsupported(fields)
    for key in UNSUPPORTED_PEFT:
        fields.pop(key, None)  # PEFT's "off" value: nothing to do
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        hint = (
            " (the init is init_lora_weights: True, False, 'gaussian' or 'article')"
            if "init" in unknown
            else ""
        )
        raise TypeError(
            f"unknown LoRA option(s) {unknown}{hint}; LoraConfig's fields are "
            f"{[f.name for f in dataclasses.fields(LoraConfig)]}."
        )
    return LoraConfig(**fields)
