"""Argument checks for the public entry points: one place, one wording.

Every check raises where the argument enters, before anything is changed, with a message that names
the argument, shows what was given and says what would work. `ArgumentTypeError` (a TypeError) for the
wrong kind of value (a string where a number belongs, None for a list), `ValueError` for a value of the
right kind that is out of range.

Covers: LoRA's own hyper-parameters (`check_rank`, `check_alpha`, `check_dropout`), the generic
checks behind them (integers, finite numbers, booleans, choices, lists of names, modules) and reading
a JSON file with an error that names it. Not here: checks that
need a model (target names, shapes: `loralib.injection`, `loralib.adapters`) or a file's schema
(`loralib.adapters`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind. It is a TypeError, and also a ValueError so that code written
    against the earlier checks (which raised ValueError for every bad argument) still catches it."""


def _given(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(value: Any, name: str, minimum: int | None = 1, hint: str = "") -> int:
    """`value` as an int >= `minimum` (None: no bound); bools and floats are refused, not truncated."""
    what = (
        "a positive integer"
        if minimum == 1
        else "an integer"
        if minimum is None
        else f"an integer >= {minimum}"
    )
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be {what}, got {_given(value)}.{tail}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}.{tail}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    positive: bool = False,
    minimum: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """`value` as a finite float (NaN and inf are refused); optional bounds: > 0, >= minimum, < below."""
    tail = f" {hint}" if hint else ""
    # numpy scalars are Real too; strings such as "0.1" are not: they would fail far from here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {_given(value)}.{tail}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.{tail}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.{tail}")
    low = "(-inf" if minimum is None else f"[{minimum:g}"
    high = "inf)" if below is None else f"{below:g})"
    if (minimum is not None and value < minimum) or (below is not None and value >= below):
        raise ValueError(f"{name} must be in {low}, {high}, got {value!r}.{tail}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """`value` if it is a bool (1, "yes" and None are refused: they are usually a misplaced argument)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {_given(value)}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`."""
    if not isinstance(value, type(choices[0])) or value not in choices:
        options = [repr(c) for c in choices]
        listed = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
        raise ValueError(f"{name} must be {listed}, got {_given(value)}.")
    return value


def check_names(value: Any, name: str, allow_empty: bool = True) -> list[str]:
    """A list/tuple/set of non-empty module names, as a list. A bare string is refused: iterating it
    would select single letters."""
    if isinstance(value, str):
        raise ArgumentTypeError(
            f"{name} must be a list of module names, got the string {value!r}; write [{value!r}]."
        )
    if value is None or not isinstance(value, (list, tuple, set, frozenset)):
        raise ArgumentTypeError(
            f"{name} must be a list of module names such as ['classifier'], got {_given(value)}."
        )
    names = list(value)
    bad = [v for v in names if not isinstance(v, str) or not v]
    if bad:
        raise ArgumentTypeError(f"{name} must hold non-empty strings, got {bad[:3]!r} in {names!r}.")
    if not names and not allow_empty:
        raise ValueError(f"{name} must name at least one module, got {names!r}.")
    return names


def check_module(model: Any, name: str = "model") -> Any:
    """`model` if it is a torch `nn.Module` (a path or a config given by mistake is named as such)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"{name} must be a torch nn.Module (e.g. AutoModelForSequenceClassification.from_pretrained(...)), "
            f"got {_given(model)}."
        )
    return model


def read_json(path: Any, what: str) -> Any:
    """Parse the JSON file `path`; a damaged file is named, with what it should be."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should be {what}: re-save it.") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file; it should be {what}: re-save it.") from e


def check_rank(r: Any, name: str = "r") -> int:
    """LoRA's rank: a positive integer."""
    return check_int(r, name, 1, hint="Typical ranks are 4, 8 or 16.")


def check_alpha(alpha: Any, name: str = "alpha") -> float | None:
    """LoRA's scaling numerator: a finite number > 0, or None (alpha = r, scaling 1)."""
    if alpha is None:
        return None
    return check_number(
        alpha, name, positive=True, hint="The update is scaled by alpha / r; None means alpha = r."
    )


def check_dropout(p: Any, name: str = "dropout") -> float:
    """A dropout probability in [0, 1)."""
    return check_number(p, name, minimum=0.0, below=1.0, hint="It is a probability in [0, 1); 0 disables it.")


def missing_model_dir(model_id: str | None) -> bool:
    """True when `model_id` is written as a local path (/, ./, ../, ~) and no such directory exists: a
    typo or a missing folder, which the hub would only report later as an unknown model id."""
    import os

    return (
        bool(model_id)
        and model_id.startswith(("/", "./", "../", "~"))
        and not os.path.isdir(os.path.expanduser(model_id))
    )
