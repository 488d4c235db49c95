"""loralib.notebook: the configuration cell's precedence and checks, and source display."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loralib.layers import LoraLayer, LoraLinear
from loralib.notebook import configure, show_source, source_of

NAMES = ("LORALIB_PROFILE", "LORALIB_MODEL_ID", "LORALIB_OUTPUT_DIR")


@pytest.fixture
def clean_env(tmp_path):
    # Restored by hand, not by monkeypatch: configure() writes os.environ itself, and monkeypatch would
    # "restore" what it wrote. Notebooks run later by nbval inherit this process's environment.
    saved = {name: os.environ.pop(name, None) for name in NAMES}
    yield tmp_path
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def test_the_cell_values_apply_and_reach_the_library(clean_env):
    import loralib

    cfg = configure("04_x", profile="gpu", model_id="some/model", output_dir=clean_env / "o")
    assert (cfg.profile, cfg.model_id, cfg.kind, cfg.benchmark) == ("gpu", "some/model", "real", True)
    assert cfg.out == clean_env / "o" / "04_x" and cfg.out.is_dir()
    assert loralib.default_model_id() == "some/model"
    assert loralib.output_dir("x") == clean_env / "o" / "x"
    assert "LORALIB_PROFILE" not in os.environ  # the profile stays a notebook-local choice


def test_environment_variables_override_the_cell(clean_env):
    os.environ["LORALIB_PROFILE"] = "toy"
    os.environ["LORALIB_OUTPUT_DIR"] = str(clean_env / "env")
    cfg = configure("05_x", profile="gpu", output_dir=clean_env / "cell")
    assert cfg.profile == "toy" and cfg.kind == "toy" and not cfg.benchmark and cfg.model_id is None
    assert cfg.out == clean_env / "env" / "05_x"


def test_bad_values_are_named(clean_env):
    with pytest.raises(ValueError, match="profile must be .* got 3"):
        configure("x", profile=3)
    with pytest.raises(ValueError, match="profile.*gpu"):
        configure("x", profile="kaggle")
    with pytest.raises(TypeError, match="model_id"):
        configure("x", model_id=42)


def test_an_edited_cell_run_again_wins_over_what_its_last_run_wrote(clean_env):
    import loralib

    configure("04_x", profile="gpu", model_id="first/model", output_dir=clean_env / "a")
    assert os.environ["LORALIB_MODEL_ID"] == "first/model"  # published for the rest of the kernel
    cfg = configure("04_x", profile="gpu", model_id="second/model", output_dir=clean_env / "b")
    assert cfg.model_id == "second/model" and cfg.out == clean_env / "b" / "04_x"
    assert loralib.default_model_id() == "second/model"
    cfg = configure("04_x", profile="smoke")  # back to the defaults: the earlier values are taken back
    assert cfg.model_id is None and "LORALIB_MODEL_ID" not in os.environ
    assert "LORALIB_OUTPUT_DIR" not in os.environ


def test_a_user_override_still_wins_after_a_run_of_the_cell(clean_env):
    configure("04_x", model_id="cell/model")
    os.environ["LORALIB_MODEL_ID"] = "user/model"  # set by the user between two runs of the cell
    assert configure("04_x", model_id="cell/model").model_id == "user/model"


def test_invalid_environment_overrides_are_named_as_such(clean_env):
    os.environ["LORALIB_PROFILE"] = "gpux"
    with pytest.raises(ValueError, match="environment variable LORALIB_PROFILE='gpux' is not a profile"):
        configure("x", profile="smoke")
    del os.environ["LORALIB_PROFILE"]
    os.environ["LORALIB_MODEL_ID"] = str(clean_env / "no-such-dir")
    with pytest.raises(ValueError, match="environment variable LORALIB_MODEL_ID=.* is not a directory"):
        configure("x")
    del os.environ["LORALIB_MODEL_ID"]
    (clean_env / "f").write_text("x")
    os.environ["LORALIB_OUTPUT_DIR"] = str(clean_env / "f")
    with pytest.raises(ValueError, match="environment variable LORALIB_OUTPUT_DIR=.* is a file"):
        configure("x")
    with pytest.raises(TypeError, match="output_dir"):
        os.environ.pop("LORALIB_OUTPUT_DIR")
        configure("x", output_dir=3)


def test_source_of_cuts_between_markers():
    full = source_of(LoraLinear.merge)
    assert full.startswith("@torch.no_grad()\ndef merge(self)")
    part = source_of(LoraLayer, start="def merge(", end="def unmerge(")
    assert part.splitlines()[0].startswith(
        "def merge("
    )  # dedented after the cut and "def unmerge(" in part.splitlines()[-1]
    with pytest.raises(ValueError, match="start marker"):
        source_of(LoraLinear, start="no such line")
    md = show_source(LoraLinear.merge)  # defined once, for every layer type
    assert md.data.startswith("`loralib.layers.base.LoraLayer.merge`:") and "```python" in md.data


def test_the_environment_is_left_as_it_was():
    # Runs after the tests above (file order): nbval's kernels inherit this process's environment.
    assert os.environ.get("LORALIB_MODEL_ID") != "some/model"


def test_a_mounted_drive_is_the_default_output_folder(clean_env, monkeypatch, capsys):
    import loralib.notebook as nb

    drive = clean_env / "MyDrive"
    monkeypatch.setattr(nb, "DRIVE", drive)
    cfg = configure("04_x", profile="colab")
    assert cfg.out != drive / "lora-from-scratch" / "outputs" / "04_x"  # not mounted: the usual default
    drive.mkdir()
    cfg = configure("04_x", profile="colab")
    assert cfg.out == drive / "lora-from-scratch" / "outputs" / "04_x" and cfg.out.is_dir()
    assert "Google Drive is mounted" in capsys.readouterr().out
    assert (
        configure("04_x", profile="colab", output_dir=clean_env / "mine").out == clean_env / "mine" / "04_x"
    )


def test_on_colab_without_drive_a_real_run_says_how_to_keep_its_outputs(clean_env, monkeypatch, capsys):
    import loralib.notebook as nb

    monkeypatch.setattr(nb, "DRIVE", clean_env / "not-mounted")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    configure("04_x", profile="colab")
    assert 'drive.mount("/content/drive")' in capsys.readouterr().out
    configure("04_x", profile="smoke")  # seconds of synthetic data: nothing worth keeping
    assert "drive.mount" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem
)
def test_every_notebook_states_its_runtime_up_front(path):
    """The first cell says how long the notebook takes on a 2-core CPU (measured) and on a T4, saying which
    figure was measured and which estimated."""
    import json

    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert "**Runtime:**" in first and "2-core CPU" in first and "T4" in first
    assert "measured" in first and "estimated" in first
