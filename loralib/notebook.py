"""What the notebooks' first cells call: the configuration cell, and showing the package's own code.

Covers `configure` (a notebook's settings: the values its configuration cell sets, each overridden by
its environment variable, checked, then made visible to every loralib call in the kernel; with no
output folder given and Google Drive mounted (Colab), outputs go to Drive so they outlive the session;
it also
hides transformers' expected load reports, `loralib.logs.quiet_loading`) and `show_source` (a
function's or class's source, or the lines between two markers, as a highlighted code block, so a
notebook shows the code it teaches instead of a copy that could drift). Not here: the setup cell that
finds or fetches the repository (generated into each notebook by `scripts/sync_notebooks.py`).
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralib.checks import check_choice, missing_model_dir

ENV = {"profile": "LORALIB_PROFILE", "model_id": "LORALIB_MODEL_ID", "output_dir": "LORALIB_OUTPUT_DIR"}
# Where Colab mounts Google Drive (`from google.colab import drive; drive.mount("/content/drive")`): a
# folder there outlives the session, so results and checkpoints go there by default once it is mounted.
DRIVE = Path("/content/drive/MyDrive")
DRIVE_OUTPUTS = ("lora-from-scratch", "outputs")
MOUNT_HINT = 'from google.colab import drive; drive.mount("/content/drive")'


def on_colab() -> bool:
    """True in a Colab runtime (its kernel sets COLAB_RELEASE_TAG)."""
    return bool(os.environ.get("COLAB_RELEASE_TAG")) or "google.colab" in sys.modules


@dataclass(frozen=True)
class NotebookConfig:
    """A notebook's resolved settings. model_id None: the profile's model (smoke: the tiny RoBERTa)."""

    notebook: str
    profile: str
    model_id: str | None
    out: Path
    kind: str  # the profile's: "smoke", "toy" or "real" (loralib.benchmark.config.Profile)

    @property
    def benchmark(self) -> bool:
        """True when this notebook's runs are benchmark numbers (a real profile)."""
        return self.kind == "real"

    def describe(self) -> str:
        model = self.model_id or "the profile's model"
        return f"{self.notebook}: profile {self.profile!r}, model {model}, writing to {self.out}"


# What configure() itself wrote into os.environ, by variable: such a value is the previous run of a
# configuration cell, not a user's override, so an edited cell run again wins over it.
_WRITTEN: dict[str, str] = {}


def _override(key: str) -> str | None:
    """The user's environment override for `key`, or None (unset, empty, or written by configure)."""
    var = ENV[key]
    value = os.environ.get(var)
    if not value or _WRITTEN.get(var) == value:
        return None
    return value


def _publish(key: str, value: str | None) -> None:
    """Make `value` what the rest of the kernel sees for `key` (or take configure's earlier value back)."""
    var = ENV[key]
    if value is None:
        if var in _WRITTEN and os.environ.get(var) == _WRITTEN.pop(var):
            del os.environ[var]
        return
    os.environ[var] = value
    _WRITTEN[var] = value


def configure(
    notebook: str,
    profile: str = "smoke",
    model_id: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> NotebookConfig:
    """Resolve a notebook's configuration cell: $LORALIB_PROFILE / $LORALIB_MODEL_ID / $LORALIB_OUTPUT_DIR win.

    The resolved model id and output folder are written back to those variables, so that
    `loralib.default_model_id()` and `loralib.output_dir()` agree with the cell everywhere in the kernel.
    Values configure wrote itself are not overrides: running an edited cell again applies the edit.
    An invalid override is named as coming from the environment.
    """
    from loralib.benchmark.config import PROFILES
    from loralib.logs import quiet_loading
    from loralib.utils import output_dir as make_output_dir

    env_profile = _override("profile")
    if env_profile is not None and env_profile not in PROFILES:
        raise ValueError(
            f"the environment variable {ENV['profile']}={env_profile!r} is not a profile; set it to one of "
            f"{', '.join(PROFILES)}, or unset it to use the configuration cell's profile."
        )
    profile = env_profile or profile
    check_choice(profile, "profile", tuple(PROFILES))
    if model_id is not None and not isinstance(model_id, str):
        raise TypeError(f"model_id must be a hub id or a directory (a string) or None, got {model_id!r}.")
    env_model = _override("model_id")
    if missing_model_dir(env_model):
        raise ValueError(
            f"the environment variable {ENV['model_id']}={env_model!r} is not a directory; set it to a local "
            "model directory or a hub id, or unset it to use the configuration cell's model."
        )
    model_id = env_model or model_id or None
    env_out = _override("output_dir")
    if (
        env_out is not None
        and Path(env_out).expanduser().exists()
        and not Path(env_out).expanduser().is_dir()
    ):
        raise ValueError(
            f"the environment variable {ENV['output_dir']}={env_out!r} is a file, not a folder; point it at a "
            "folder, or unset it to use the configuration cell's output_dir."
        )
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a folder path or None, got {output_dir!r}.")
    out = env_out or output_dir
    if out is None and DRIVE.is_dir():  # Drive is mounted: what this run writes outlives the session
        out = DRIVE.joinpath(*DRIVE_OUTPUTS)
        print(f"Google Drive is mounted: results and checkpoints go to {out} (set OUTPUT_DIR to change it).")
    elif out is None and on_colab() and PROFILES[profile].benchmark:
        print(
            "Results and checkpoints go to this Colab session's disk and end with it. To keep them and resume "
            f"after a disconnect, mount Google Drive ({MOUNT_HINT}) and run this cell again: they then go "
            f"to {DRIVE.joinpath(*DRIVE_OUTPUTS)}."
        )
    _publish("model_id", model_id)
    _publish("output_dir", None if out is None else str(Path(out).expanduser()))
    quiet_loading()
    return NotebookConfig(
        notebook=notebook,
        profile=profile,
        model_id=model_id,
        out=make_output_dir(notebook),
        kind=PROFILES[profile].kind,
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
