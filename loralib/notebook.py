"""What the notebooks' first cells call: the configuration cell, and showing the package's own code.

Covers `configure` (a notebook's settings: the values its configuration cell sets, each overridden by
its environment variable, checked, then made visible to every loralib call in the kernel; it also
hides transformers' expected load reports, `loralib.logs.quiet_loading`) and `show_source` (a
function's or class's source, or the lines between two markers, as a highlighted code block, so a
notebook shows the code it teaches instead of a copy that could drift). Not here: the setup cell that
finds or fetches the repository (generated into each notebook by `scripts/sync_notebooks.py`).
"""

from __future__ import annotations

import inspect
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralib.checks import check_choice

ENV = {"profile": "LORALIB_PROFILE", "model_id": "LORALIB_MODEL_ID", "output_dir": "LORALIB_OUTPUT_DIR"}


@dataclass(frozen=True)
class NotebookConfig:
    """A notebook's resolved settings. model_id None: the profile's model (smoke: the tiny RoBERTa)."""

    notebook: str
    profile: str
    model_id: str | None
    out: Path
    smoke: bool

    def describe(self) -> str:
        model = self.model_id or "the profile's model"
        return f"{self.notebook}: profile {self.profile!r}, model {model}, writing to {self.out}"


def configure(
    notebook: str,
    profile: str = "smoke",
    model_id: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> NotebookConfig:
    """Resolve a notebook's configuration cell: $LORALIB_PROFILE / $LORALIB_MODEL_ID / $LORALIB_OUTPUT_DIR win.

    The resolved model id and output folder are written back to those variables, so that
    `loralib.default_model_id()` and `loralib.output_dir()` agree with the cell everywhere in the kernel.
    """
    from loralib.benchmark.config import PROFILES
    from loralib.logs import quiet_loading
    from loralib.utils import output_dir as make_output_dir

    profile = os.environ.get(ENV["profile"]) or profile
    check_choice(profile, "profile", tuple(PROFILES))
    model_id = os.environ.get(ENV["model_id"]) or model_id or None
    if model_id is not None:
        if not isinstance(model_id, str):
            raise TypeError(f"model_id must be a hub id or a directory (a string) or None, got {model_id!r}.")
        os.environ[ENV["model_id"]] = model_id
    output_dir = os.environ.get(ENV["output_dir"]) or output_dir
    if output_dir is not None:
        os.environ[ENV["output_dir"]] = str(Path(output_dir).expanduser())
    quiet_loading()
    return NotebookConfig(
        notebook=notebook,
        profile=profile,
        model_id=model_id,
        out=make_output_dir(notebook),
        smoke=PROFILES[profile].smoke,
    )


def source_of(obj: Any, start: str | None = None, end: str | None = None) -> str:
    """The source of `obj`, dedented; with start / end, only the lines from the first containing `start`
    to the first after it containing `end` (both included)."""
    lines = textwrap.dedent(inspect.getsource(obj)).splitlines()
    if start is not None:
        hits = [i for i, line in enumerate(lines) if start in line]
        if not hits:
            raise ValueError(
                f"start marker {start!r} is not in the source of {getattr(obj, '__qualname__', obj)}."
            )
        lines = lines[hits[0] :]
    if end is not None:
        hits = [i for i, line in enumerate(lines) if end in line]
        if not hits:
            raise ValueError(
                f"end marker {end!r} is not in the source of {getattr(obj, '__qualname__', obj)}."
            )
        lines = lines[: hits[0] + 1]
    return textwrap.dedent("\n".join(lines))


def show_source(obj: Any, start: str | None = None, end: str | None = None):
    """`source_of` as a Markdown code block (displayed by Jupyter), headed by where the code lives."""
    from IPython.display import Markdown

    where = f"{obj.__module__}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
    return Markdown(f"`{where}`:\n\n```python\n{source_of(obj, start, end)}\n```")
