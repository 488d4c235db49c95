"""scripts/sync_notebooks.py: the notebooks' setup cells and the README's Colab badges follow pyproject.toml."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("sync_notebooks", ROOT / "scripts" / "sync_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nothing_drifted():
    assert _script().main(["--check"]) == 0


def test_every_notebook_opens_with_the_generated_setup_cell():
    sync = _script()
    repo = sync.repository()
    for path in sync.notebooks():
        cells = json.loads(path.read_text())["cells"]
        first = next(c for c in cells if c["cell_type"] == "code")
        assert first["metadata"]["tags"] == ["setup"], path.name
        source = "".join(first["source"])
        assert (
            f'REPO = os.environ.get("LORALIB_REPO") or "{repo}"' in source and "%matplotlib inline" in source
        )
        assert "requirements-nodeps.txt" in source  # the toy profile's wheel: the default profiles need it
        assert sum("tags" in c.get("metadata", {}) and "setup" in c["metadata"]["tags"] for c in cells) == 1


def test_the_url_flows_from_one_place():
    sync = _script()
    other = "https://github.com/someone/fork"
    nb = json.loads(sync.synced_notebook(sync.notebooks()[0], other))
    assert any(f'or "{other}"' in "".join(c["source"]) for c in nb["cells"])
    readme = sync.synced_readme(other)
    assert (
        "colab.research.google.com/github/someone/fork/blob/main/notebooks/04_glue_benchmark.ipynb" in readme
    )
    assert readme.count("colab-badge.svg") == len(sync.notebooks())


def test_without_a_public_address_nothing_points_at_a_guessed_one():
    sync = _script()
    assert sync.repository() == ""  # the project has none yet
    readme = (ROOT / "README.md").read_text()
    assert "colab-badge.svg" not in readme and sync.NO_ADDRESS in readme
    for path in sync.notebooks():
        assert "github.com" not in path.read_text(), path.name


def test_a_notebook_opened_alone_without_the_code_says_how_to_get_it(tmp_path):
    """The setup cell, run in an empty folder with no LORALIB_REPO: a clear RuntimeError, no git call."""
    import os
    import subprocess
    import sys

    sync = _script()
    cell = sync.SETUP_CELL.format(repo="")
    code = cell.split("%matplotlib inline")[0]  # the part that runs before IPython's magic
    env = {k: v for k, v in os.environ.items() if k != "LORALIB_REPO"}
    env["PATH"] = ""  # git must not even be called
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "RuntimeError: This notebook needs the lora-from-scratch repository beside it" in out.stderr
    assert "LORALIB_REPO" in out.stderr and "CalledProcessError" not in out.stderr
    env["LORALIB_REPO"] = str(tmp_path / "no-such-repo")
    env["PATH"] = os.environ["PATH"]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "RuntimeError: git clone" in out.stderr and "CalledProcessError" not in out.stderr
