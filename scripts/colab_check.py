"""Run notebooks the way a Colab user does: opened alone, in an environment that already has its own packages.

Usage: python scripts/colab_check.py [--image colab|floors ...] [--notebook 01 ...] [--cache DIR]

For each image (a set of preinstalled packages) it builds a virtual environment once (cached under
--cache): torch 2.13.0 (the CPU build stands in for Colab's CUDA build) and a Jupyter kernel, plus
- `colab`: recent versions like those Colab ships (`COLAB`), without bitsandbytes, evaluate, the toy
  model's wheel or this package, which Colab does not have;
- `floors`: every requirement of requirements-runtime.txt at its floor (`name>=X` installed as `name==X`),
  so that the ranges' lower ends are tested, not guessed.
Then for each notebook: an empty folder holding only that notebook, executed top to bottom with
$LORALIB_REPO pointing at this checkout's committed HEAD (uncommitted changes are not in it), offline
(HF_HUB_OFFLINE=1), at its default settings. The setup cell must clone, install what is missing and
nothing else. After each notebook it reports what the setup cell installed and what it changed; a
preinstalled package it changed is a failure. What it added is uninstalled before the next notebook,
so each starts from the image as built.

Exit status 1 when a notebook fails or a preinstalled package changed. `make colab-check` runs it on
01, 04 and 07 in both images. Not part of `make test` (about 15-25 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
JUPYTER = ["ipykernel==7.4.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipywidgets==8.1.9"]
# What a Colab GPU runtime brings that this project uses, at versions like Colab's (a guess at a
# recent image: newer transformers and accelerate than requirements.txt pins, older numpy/matplotlib).
COLAB = [
    "transformers==5.24.0",  # what Colab shipped when this was written (5.25 needs kernels 0.19, not on PyPI's mirror here)
    "accelerate==1.16.0",
    "peft==0.21.2",
    "datasets==4.8.5",
    "safetensors==0.8.0",
    "numpy==2.0.2",
    "matplotlib==3.10.9",
    "tqdm==4.67.1",
    "scipy==1.14.1",
    "packaging==24.2",
]
DEFAULT_NOTEBOOKS = ["01", "04", "07"]

RUNNER = r"""
import json, sys, time
import nbformat
from nbclient import NotebookClient
path, cwd = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
t0 = time.perf_counter()
try:
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    ok, error = True, ""
except Exception as exc:  # the failing cell's error, for the report
    ok, error = False, f"{type(exc).__name__}: {str(exc)[-3000:]}"
nbformat.write(nb, path)
setup_out = "".join(o.get("text", "") for o in nb.cells[1].get("outputs", []) if o.get("output_type") == "stream")
print(json.dumps({"ok": ok, "error": error, "seconds": time.perf_counter() - t0, "setup_output": setup_out[-2000:]}))
"""


def floors() -> list[str]:
    """requirements-runtime.txt with each `>=X` turned into `==X` (torch is installed on its own)."""
    out = []
    for line in (ROOT / "requirements-runtime.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("torch"):
            continue
        if ">=" not in line:
            raise SystemExit(f"requirements-runtime.txt: {line!r} has no floor (>=) to test.")
        name, rest = line.split(">=", 1)
        out.append(f"{name}=={rest.split(',')[0]}")
    return out


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def packages(python: Path) -> dict[str, str]:
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True
    )
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}


def build_image(name: str, cache: Path) -> Path:
    wanted = [TORCH, *JUPYTER, *(COLAB if name == "colab" else floors())]
    venv = cache / name
    stamp = venv / ".colab-check-stamp"
    if stamp.is_file() and stamp.read_text() == "\n".join(wanted):
        return venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)
    print(f"[{name}] building the image: {' '.join(wanted)}", flush=True)
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(py), "-m", "pip", "install", "-q", TORCH])
    run([str(py), "-m", "pip", "install", "-q", *wanted])
    stamp.write_text("\n".join(wanted))
    return py


def restore(py: Path, image: dict[str, str]) -> None:
    """Put the environment back to the image: uninstall what was added, reinstall what was changed."""
    now = packages(py)
    added = [n for n in now if n not in image and n != "pip"]
    changed = [f"{n}=={v}" for n, v in image.items() if n in now and now[n] != v]
    if added:
        run([str(py), "-m", "pip", "uninstall", "-q", "-y", *added])
    if changed:
        run([str(py), "-m", "pip", "install", "-q", "--no-deps", *changed])


def check_notebook(py: Path, image_name: str, stem: str, repo_url: str, work: Path) -> dict:
    (notebook,) = sorted((ROOT / "notebooks").glob(f"{stem}_*.ipynb"))
    folder = work / f"{image_name}-{notebook.stem}"
    folder.mkdir()
    shutil.copy(notebook, folder / notebook.name)
    image = packages(py)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORALIB_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(LORALIB_REPO=repo_url, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    env["PATH"] = f"{py.parent}:{env.get('PATH', '')}"
    done = subprocess.run(
        [str(py), "-c", RUNNER, str(folder / notebook.name), str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"ok": False, "error": done.stderr[-3000:], "seconds": 0.0, "setup_output": ""}
    after = packages(py)
    report["added"] = {n: v for n, v in after.items() if n not in image}
    report["changed"] = {n: (v, after[n]) for n, v in image.items() if n in after and after[n] != v}
    report["removed"] = [n for n in image if n not in after]
    report["notebook"] = notebook.name
    restore(py, image)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", action="append", choices=["colab", "floors"], help="default: both")
    ap.add_argument("--notebook", action="append", help="notebook number, e.g. 04 (default: 01, 04, 07)")
    ap.add_argument("--cache", default=str(ROOT / ".colab-check"), help="where the images' venvs are kept")
    args = ap.parse_args(argv)
    head = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    if head.stdout.strip():
        print("note: the working tree has uncommitted changes; the notebooks clone the committed HEAD.")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="colab-check-") as tmp:
        for image_name in args.image or ["colab", "floors"]:
            t0 = time.perf_counter()
            py = build_image(image_name, cache)
            print(f"[{image_name}] image ready in {time.perf_counter() - t0:.0f} s", flush=True)
            for stem in args.notebook or DEFAULT_NOTEBOOKS:
                r = check_notebook(py, image_name, stem, f"file://{ROOT}", Path(tmp))
                bad = not r["ok"] or r["changed"] or r["removed"]
                failures += bool(bad)
                print(
                    f"[{image_name}] {r['notebook']}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s; "
                    f"installed {', '.join(f'{n} {v}' for n, v in sorted(r['added'].items())) or 'nothing'}; "
                    f"changed {', '.join(f'{n} {a} -> {b}' for n, (a, b) in r['changed'].items()) or 'nothing'}"
                    + (f"; removed {', '.join(r['removed'])}" if r["removed"] else ""),
                    flush=True,
                )
                if not r["ok"]:
                    print(r["error"], flush=True)
    print("colab-check:", "FAILED" if failures else "passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
