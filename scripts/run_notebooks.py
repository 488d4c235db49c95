"""Execute the notebook series headless, in order, and write executed copies plus figures to an output folder.

Usage: python scripts/run_notebooks.py [--output-dir outputs] [--only 01 03] [--timeout 900]

Runs offline on the embedded default (tiny random RoBERTa + bundled data) unless LORALIB_MODEL_ID /
LORALIB_PROFILE say otherwise. Figures and results land in <output-dir>/<notebook>/ (via
loralib.output_dir), executed notebooks in <output-dir>/executed/. Exits non-zero if any notebook fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="outputs", help="where executed notebooks and figures go")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    args = ap.parse_args(argv)

    out = Path(args.output_dir).resolve()
    (out / "executed").mkdir(parents=True, exist_ok=True)
    os.environ["LORALIB_OUTPUT_DIR"] = str(out)
    if not os.environ.get("LORALIB_MODEL_ID"):
        # The embedded default never needs the hub; failing fast beats a hanging download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name[:2] in args.only]
    failed, timings = [], []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        print(f"[run] {path.name} ...", flush=True)
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as e:
            status = "FAILED"
            failed.append(path.name)
            print(str(e)[-3000:], file=sys.stderr)
        elapsed = time.perf_counter() - start
        images = sum(
            "image/png" in out.get("data", {})
            for cell in nb.cells
            if cell.cell_type == "code"
            for out in cell.outputs
        )
        if status == "ok" and images == 0:
            # Every notebook draws figures; none inline means the backend was wrong (e.g. MPLBACKEND=Agg).
            status = "FAILED"
            failed.append(path.name)
            print(f"{path.name}: no inline figures in the executed notebook", file=sys.stderr)
        timings.append((path.name, status, elapsed))
        nbformat.write(nb, out / "executed" / path.name)
        print(f"[run] {path.name}: {status} in {elapsed:.1f} s", flush=True)
    print("\nnotebook                                 status   seconds")
    for name, status, secs in timings:
        print(f"{name:<40} {status:<8} {secs:7.1f}")
    print(f"\nexecuted notebooks: {out / 'executed'}\nfigures and results: {out}/<notebook>/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
