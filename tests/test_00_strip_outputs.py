"""Committed notebooks carry no outputs (scripts/strip_outputs.py), and the git filter strips what
JupyterLab autosaves. Reference: the notebook JSON itself."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _script():
    spec = importlib.util.spec_from_file_location("strip_outputs", ROOT / "scripts" / "strip_outputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebooks_carry_no_outputs(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty[:5]} have outputs; run python scripts/strip_outputs.py {path}"
    )
    assert _script().dumps(_script().strip(json.loads(text))) == text  # already in the stripped form


def test_the_filter_strips_an_executed_notebook():
    nb = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    clean = NOTEBOOKS[0].read_text(encoding="utf-8")
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    code["execution_count"] = 3
    code["metadata"]["execution"] = {"iopub.status.busy": "2026-12-02T10:00:00"}
    nb["metadata"]["widgets"] = {"state": {}}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "strip_outputs.py")],
        input=json.dumps(nb), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout == clean
    attrs = (ROOT / ".gitattributes").read_text()
    assert "notebooks/*.ipynb filter=strip-outputs" in attrs
