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
        assert f'REPO = "{repo}"' in source and "%matplotlib inline" in source
        assert sum("tags" in c.get("metadata", {}) and "setup" in c["metadata"]["tags"] for c in cells) == 1


def test_the_url_flows_from_one_place():
    sync = _script()
    other = "https://github.com/someone/fork"
    nb = json.loads(sync.synced_notebook(sync.notebooks()[0], other))
    assert f'REPO = "{other}"' in "".join(nb["cells"][1]["source"]) or any(
        f'REPO = "{other}"' in "".join(c["source"]) for c in nb["cells"]
    )
    readme = sync.synced_readme(other)
    assert (
        "colab.research.google.com/github/someone/fork/blob/main/notebooks/04_glue_benchmark.ipynb" in readme
    )
    assert readme.count("colab-badge.svg") == len(sync.notebooks())
