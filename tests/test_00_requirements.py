"""The requirement files agree: requirements-runtime.txt holds ranges, requirements.txt pins each of them at
a version inside its range (what `make test` tests), and the setup cell's check of what is unmet (the
Colab path: install only that) reads ranges as pip does. The ranges' floors are run by
`make colab-check` (scripts/colab_check.py), not here."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sync_notebooks  # noqa: E402


def _requirements(name: str) -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[req.name.lower()] = req
    return out


RUNTIME = _requirements("requirements-runtime.txt")
PINNED = _requirements("requirements.txt")


def test_runtime_requirements_are_ranges_with_floors():
    for name, req in RUNTIME.items():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "==" not in ops, f"{name}: a range with a floor, got {req}"


@pytest.mark.parametrize("name", sorted(n for n in RUNTIME if n != "torch"))
def test_each_runtime_requirement_is_pinned_inside_its_range(name):
    pin = PINNED.get(name)
    assert pin is not None, f"{name} is a runtime requirement but requirements.txt does not pin it"
    (spec,) = pin.specifier
    assert spec.operator == "==", f"requirements.txt must pin {name} exactly, got {pin}"
    assert RUNTIME[name].specifier.contains(spec.version), (
        f"{name}=={spec.version} is outside {RUNTIME[name]}"
    )


def test_the_installed_environment_is_the_pinned_one():
    for name, pin in PINNED.items():
        if name == "torch":
            continue
        (spec,) = pin.specifier
        assert md.version(name) == spec.version, (
            f"{name}: installed {md.version(name)}, pinned {spec.version}"
        )


def _unmet():
    """The setup cell's `_unmet`, taken from the template the notebooks are generated from."""
    source = sync_notebooks.SETUP_CELL.replace("{{", "{").replace("}}", "}")
    block = re.search(r"^def _unmet\(path\):.*?^    return unmet$", source, re.S | re.M).group(0)
    scope = {"md": md}
    exec(block, scope)
    return scope["_unmet"]


def test_the_setup_cell_installs_only_what_is_unmet(tmp_path):
    have = md.version("numpy")
    major = int(have.split(".")[0])
    reqs = tmp_path / "r.txt"
    reqs.write_text(
        f"# a comment\nnumpy>={major}.0  # satisfied\nnumpy>={major + 1}.0\n"
        "surely-not-installed-pkg>=1.0\n\ntqdm>=0.1,<0.2\n"
    )
    assert _unmet()(reqs) == [f"numpy>={major + 1}.0", "surely-not-installed-pkg>=1.0", "tqdm>=0.1,<0.2"]


def test_the_runtime_file_is_satisfied_here_so_the_setup_cell_installs_nothing():
    assert _unmet()(ROOT / "requirements-runtime.txt") == []
    assert _unmet()(ROOT / "requirements-nodeps.txt") == []


def test_the_package_declares_the_runtime_ranges():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    assert {r.name.lower(): str(r.specifier) for r in declared} == {
        name: str(req.specifier) for name, req in RUNTIME.items()
    }
