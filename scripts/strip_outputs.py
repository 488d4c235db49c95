"""Strip outputs from notebooks so that studying them in JupyterLab does not dirty the repository.

    python scripts/strip_outputs.py notebooks/*.ipynb   # rewrite the files in place
    python scripts/strip_outputs.py < nb.ipynb          # stdin -> stdout: git's clean filter

`scripts/setup.sh` registers the second form as the git filter "strip-outputs", which `.gitattributes`
applies to notebooks/*.ipynb: what git stores has no outputs, whatever the working copy holds.
tests/test_00_strip_outputs.py fails if a committed notebook carries outputs. Covers: the outputs,
execution counts, run timings in cell metadata and widget state; not the cells' sources or tags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled")
NOTEBOOK_METADATA_DROPPED = ("widgets",)


def strip(nb: dict) -> dict:
    """The notebook without outputs, execution counts, timings or widget state."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in CELL_METADATA_DROPPED:
            cell.get("metadata", {}).pop(key, None)
    for key in NOTEBOOK_METADATA_DROPPED:
        nb.get("metadata", {}).pop(key, None)
    return nb


def dumps(nb: dict) -> str:
    """The repository's notebook format: one-space indent, UTF-8 as is, a final newline."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(dumps(strip(json.loads(sys.stdin.read()))))
        return 0
    for name in argv:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        new = dumps(strip(json.loads(text)))
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
