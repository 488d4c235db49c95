"""Convert a percent-format Python script (cells start with `# %%`, markdown cells with
`# %% [markdown]` and lines prefixed by `# `) into a clean .ipynb with no outputs.

Usage: python scripts/py2nb.py SRC.py notebooks/NN_name.ipynb
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def convert(src: str) -> nbformat.NotebookNode:
    cells, kind, buf = [], None, []

    def flush() -> None:
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        if not text:
            return
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in text.splitlines()]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in src.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nbformat.write(convert(Path(src).read_text()), dst)
    print(f"wrote {dst}")
