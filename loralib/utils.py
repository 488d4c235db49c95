"""Small helpers every module uses: seeding, package versions, devices and mixed precision, parameter
counts, output folders.

Not here: anything LoRA-specific beyond counting (see `loralib.layers` / `loralib.injection`), the
default model (`loralib.tiny.default_model_id`), atomic writes and consistent reads (`loralib.files`).
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "datasets",
    "peft",
    "bitsandbytes",
    "numpy",
)


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) so a cell reruns identically."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages results depend on, plus python, loralib and the device."""
    out = {"python": platform.python_version()}
    for name in ("lora-from-scratch", *packages):
        try:
            out["loralib" if name == "lora-from-scratch" else name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["device"] = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    )
    return out


def print_versions() -> None:
    """Print `versions()` one per line (the first cell of every notebook)."""
    for k, v in versions().items():
        print(f"{k:>13}: {v}")


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True where bf16 runs natively: a CUDA GPU with bf16 units (Ampere and later), not emulated.

    `torch.cuda.is_bf16_supported()` also says True on a T4 (Turing), where bf16 is emulated and slow;
    there fp16 with gradient scaling is the right mixed precision. False on CPU: see `loralib.peft_backend`.
    """
    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4 has no including_emulation: ask for compute capability >= 8
        return torch.cuda.get_device_capability(dev)[0] >= 8


def mixed_precision(device: torch.device | str | None = None) -> str:
    """The training precision for `device`: "bf16" (native bf16 GPUs), "fp16" (other GPUs: autocast
    with gradient scaling; LoRA's fp32 adapter weights make the scaler work) or "fp32" (CPU)."""
    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(dev) else "fp16"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ParameterCount:
    """Totals plus a per-parameter table (name, shape, numel, trainable)."""

    total: int
    trainable: int
    rows: list[tuple[str, tuple[int, ...], int, bool]] = field(repr=False, default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def table(self, only_trainable: bool = False, max_rows: int | None = None) -> str:
        """The rows as aligned text, like printing `named_parameters()` with shapes and flags."""
        rows = [r for r in self.rows if r[3] or not only_trainable]
        shown = rows if max_rows is None else rows[:max_rows]
        width = max((len(r[0]) for r in shown), default=4)
        lines = [f"{'name':<{width}}  {'shape':<16} {'numel':>11}  trainable"]
        for name, shape, n, t in shown:
            lines.append(f"{name:<{width}}  {str(list(shape)):<16} {n:>11,}  {'yes' if t else 'no'}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more rows")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count total and trainable parameters (shared tensors once) and keep a per-parameter table."""
    rows, seen, total, trainable = [], set(), 0, 0
    for name, p in model.named_parameters():
        n = p.numel()
        rows.append((name, tuple(p.shape), n, p.requires_grad))
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += n
        trainable += n if p.requires_grad else 0
    return ParameterCount(total=total, trainable=trainable, rows=rows)


def repo_root() -> Path | None:
    """The checkout this loralib was imported from, or None when it was installed as a package (then
    there is no checkout next to it: nothing may be written inside site-packages)."""
    root = Path(__file__).resolve().parent.parent
    is_checkout = (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir()
    return root if is_checkout else None


def output_dir(*parts: str) -> Path:
    """Where notebooks and runs write figures and results: $LORALIB_OUTPUT_DIR, else <checkout>/outputs
    when loralib is imported from a checkout, else ./outputs in the working directory (an installed
    package never writes into site-packages).

    Tests point LORALIB_OUTPUT_DIR at a temporary directory so they never write into the checkout.
    """
    checkout = repo_root()
    default = checkout / "outputs" if checkout is not None else Path.cwd() / "outputs"
    root = Path(os.environ.get("LORALIB_OUTPUT_DIR") or default)
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
