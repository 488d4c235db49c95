"""Installed as a package (`pip install .`), loralib works from any directory and writes nothing into
site-packages: output folders default to the working directory. The reference is the file system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_pip_installed_loralib_writes_into_the_working_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "loralib", src / "loralib", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
    ]
    subprocess.run([*pip, str(src)], check=True, capture_output=True, text=True, timeout=600)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LORALIB_OUTPUT_DIR",)}
    env["PYTHONPATH"] = str(site)
    code = (
        "import loralib, loralib.utils as u, torch\n"
        f"assert loralib.__file__.startswith({str(site)!r}), loralib.__file__\n"
        "assert u.repo_root() is None\n"
        "print(u.output_dir('nb'))\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "loralib.inject_lora(m, ['0'], r=2)\n"
        "loralib.save_lora(m, 'adapter')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stdout.strip() == str(work / "outputs" / "nb")
    assert (work / "adapter" / "adapter.safetensors").exists()
    before = {p for p in site.rglob("*") if "__pycache__" not in p.parts}
    assert not [p for p in before if p.name in ("outputs", "adapter")]  # nothing written beside the package


def test_in_a_checkout_outputs_go_next_to_the_notebooks():
    import loralib.utils as u

    assert (
        u.repo_root() == ROOT
    )  # so output_dir() defaults to <checkout>/outputs, as `make notebooks` expects
