"""loralib.notebook: the configuration cell's precedence and checks, and source display."""

from __future__ import annotations

import pytest

from loralib.layers import LoraLinear
from loralib.notebook import configure, show_source, source_of


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("LORALIB_PROFILE", "LORALIB_MODEL_ID", "LORALIB_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_cell_values_apply_and_reach_the_library(clean_env, monkeypatch):
    import os

    import loralib

    cfg = configure("04_x", profile="gpu", model_id="some/model", output_dir=clean_env / "o")
    assert (cfg.profile, cfg.model_id, cfg.smoke) == ("gpu", "some/model", False)
    assert cfg.out == clean_env / "o" / "04_x" and cfg.out.is_dir()
    assert loralib.default_model_id() == "some/model"
    assert loralib.output_dir("x") == clean_env / "o" / "x"
    for name in ("LORALIB_MODEL_ID", "LORALIB_OUTPUT_DIR"):
        monkeypatch.delenv(name)  # configure wrote them; leave no trace for other tests
    assert "LORALIB_PROFILE" not in os.environ


def test_environment_variables_override_the_cell(clean_env, monkeypatch):
    monkeypatch.setenv("LORALIB_PROFILE", "toy")
    monkeypatch.setenv("LORALIB_OUTPUT_DIR", str(clean_env / "env"))
    cfg = configure("05_x", profile="gpu", output_dir=clean_env / "cell")
    assert cfg.profile == "toy" and cfg.smoke and cfg.model_id is None
    assert cfg.out == clean_env / "env" / "05_x"


def test_bad_values_are_named(clean_env):
    with pytest.raises(ValueError, match="profile must be .* got 3"):
        configure("x", profile=3)
    with pytest.raises(ValueError, match="profile.*gpu"):
        configure("x", profile="colab")
    with pytest.raises(TypeError, match="model_id"):
        configure("x", model_id=42)


def test_source_of_cuts_between_markers():
    full = source_of(LoraLinear.merge)
    assert full.startswith("@torch.no_grad()\ndef merge(self)")
    part = source_of(LoraLinear, start="def merge(", end="def unmerge(")
    assert part.splitlines()[0].startswith(
        "def merge("
    )  # dedented after the cut and "def unmerge(" in part.splitlines()[-1]
    with pytest.raises(ValueError, match="start marker"):
        source_of(LoraLinear, start="no such line")
    md = show_source(LoraLinear.merge)
    assert md.data.startswith("`loralib.layers.LoraLinear.merge`:") and "```python" in md.data
