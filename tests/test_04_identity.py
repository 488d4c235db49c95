"""A resumed or reused benchmark run is the run it claims to be (`loralib.benchmark.identity`).

References: an uninterrupted run with the same settings (its metrics and adapter), and the settings the
user passed (named, with both values, in every refusal)."""

from __future__ import annotations

import json
import shutil

import pytest

from loralib.benchmark.identity import (
    MANIFEST_NAME,
    NOT_IDENTITY,
    CheckpointError,
    RunMismatchError,
    checkpoint_problem,
    run_identity,
)
from loralib.benchmark.results import ResultsExistError
from loralib.benchmark.run import CHECKPOINTS_DIR, run_task

KW = dict(epochs=3, warmup_epochs=1.0, progress=False)


class _Disconnect(Exception):
    pass


def _disconnect_after_first_save():
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise _Disconnect(f"disconnected at step {state.global_step}")

    return Callback()


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run interrupted right after its first epoch's checkpoint, kept pristine; tests copy it."""
    root = tmp_path_factory.mktemp("cut")
    with pytest.raises(_Disconnect):
        run_task("sst2", "smoke", output_dir=root, callbacks=[_disconnect_after_first_save()], **KW)
    return root


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return run_task("sst2", "smoke", output_dir=tmp_path_factory.mktemp("full"), **KW)


def _copy(cut, tmp_path):
    shutil.copytree(cut, tmp_path / "run")
    return tmp_path / "run"


def _ckpt(root):
    (c,) = (root / "sst2" / CHECKPOINTS_DIR).glob("checkpoint-*")
    return c


def test_the_checkpoint_records_every_setting_that_changes_the_numbers(cut):
    manifest = json.loads((_ckpt(cut) / MANIFEST_NAME).read_text())
    ident = manifest["identity"]
    assert manifest["epoch"] == 1 and checkpoint_problem(_ckpt(cut)) is None
    for key in ("seed", "learning_rate", "r", "lora_alpha", "backend", "target_modules", "epochs", "profile"):
        assert key in ident, key
    assert not set(NOT_IDENTITY) & set(ident)
    assert all(v["size"] > 0 and len(v["sha256"]) == 64 for v in manifest["files"].values())


@pytest.mark.parametrize(
    "change, name",
    [({"seed": 1}, "seed"), ({"learning_rate": 1e-3}, "learning_rate"), ({"backend": "peft"}, "backend"),
     ({"r": 4}, "r"), ({"lora_dropout": 0.0}, "lora_dropout"), ({"max_train_samples": 32}, "max_train_samples")],
    ids=lambda v: str(v),
)  # fmt: skip
def test_resume_with_other_settings_is_refused_naming_them(cut, tmp_path, change, name):
    root = _copy(cut, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in _ckpt(root).iterdir()}
    with pytest.raises(RunMismatchError) as info:
        run_task("sst2", "smoke", output_dir=root, resume=True, **{**KW, **change})
    msg = str(info.value)
    assert f"{name}: checkpoint" in msg and _shown(change[name]) in msg and "epochs (more" in msg
    assert {p.name: p.stat().st_mtime_ns for p in _ckpt(root).iterdir()} == before  # nothing touched
    assert not (root / "sst2" / "results.json").exists()


def test_settings_that_never_change_the_numbers_may_change_on_resume(cut, full, tmp_path):
    root = _copy(cut, tmp_path)
    res = run_task("sst2", "smoke", output_dir=root, resume=True, **{**KW, "eval_batch_size": 16})
    assert res["metrics"] == pytest.approx(full["metrics"], rel=1e-6)
    assert res["resumed"] == [{"checkpoint": _ckpt(cut).name, "epoch": 1, "changed": {}}]


def test_more_epochs_on_resume_extend_the_run_and_are_recorded(cut, tmp_path):
    root = _copy(cut, tmp_path)
    res = run_task("sst2", "smoke", output_dir=root, resume=True, **{**KW, "epochs": 4})
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3, 4] and res["config"]["epochs"] == 4
    assert res["resumed"][0]["changed"] == {"epochs": [3, 4]}
    written = json.loads((root / "sst2" / "results.json").read_text())
    assert written["resumed"] == res["resumed"]
    with pytest.raises(RunMismatchError, match="epochs"):  # fewer than already done: not an extension
        root2 = _copy(cut, tmp_path / "b")
        run_task("sst2", "smoke", output_dir=root2, resume=True, **{**KW, "epochs": 1, "warmup_epochs": 0.5})


def test_a_save_cut_short_falls_back_to_the_last_complete_checkpoint(cut, full, tmp_path, capsys):
    root = _copy(cut, tmp_path)
    good = _ckpt(root)
    partial = good.parent / "checkpoint-999"  # a newer save that died half-way: no manifest, a short file
    shutil.copytree(good, partial)
    (partial / MANIFEST_NAME).unlink()
    weights = max(partial.iterdir(), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:100])
    res = run_task("sst2", "smoke", output_dir=root, resume=True, **KW)
    out = capsys.readouterr().out
    assert f"falling back to {good}" in out and "checkpoint-999 is incomplete" in out
    assert res["metrics"] == pytest.approx(full["metrics"], rel=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_only_checkpoint_is_named_in_the_error(cut, tmp_path, damage):
    root = _copy(cut, tmp_path)
    ckpt = _ckpt(root)
    victim = max((p for p in ckpt.iterdir() if p.name != MANIFEST_NAME), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        victim.unlink()
    with pytest.raises(CheckpointError) as info:
        run_task("sst2", "smoke", output_dir=root, resume=True, **KW)
    assert str(ckpt) in str(info.value) and victim.name in str(info.value)
    assert ("missing" if damage == "delete" else "damaged") in str(info.value)


def test_reusing_a_finished_run_compares_every_setting(full, tmp_path):
    root = tmp_path / "done"
    run_task("sst2", "smoke", output_dir=root, **KW)
    again = run_task("sst2", "smoke", output_dir=root, **{**KW, "progress": True, "num_threads": 2})
    assert again["skipped"] is True
    for change in ({"r": 4}, {"learning_rate": 2e-3}, {"lora_alpha": 16.0}, {"epochs": 4}):
        with pytest.raises(ResultsExistError) as info:
            run_task("sst2", "smoke", output_dir=root, **{**KW, **change})
        (name,) = change
        assert f"{name}: finished run" in str(info.value) and _shown(change[name]) in str(info.value)


def test_identity_of_old_results_without_newer_fields_is_read_with_their_defaults():
    from loralib.benchmark.config import config_from_results, make_config

    cfg = make_config("sst2", "smoke")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("use_rslora", "loraplus_lr_ratio")}
    assert run_identity(config_from_results({"config": old}), "smoke") == run_identity(cfg, "smoke")


def test_the_cli_refuses_a_mismatched_resume_with_exit_2(cut, tmp_path, capsys):
    from loralib.benchmark.cli import main

    root = _copy(cut, tmp_path)
    args = ["--task", "sst2", "--output-dir", str(root), "--resume", "--no-progress", "--epochs", "3"]
    assert main([*args, "--warmup-epochs", "1", "--seed", "5"]) == 2
    assert "seed: checkpoint 0, now 5" in capsys.readouterr().err


def _shown(value) -> str:
    """How a setting appears in the message: as its JSON record holds it (PEFT writes 16.0 as 16)."""
    return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _local_sst2(tmp_path, flip_first_label=False):
    """The bundled SST-2 copied into a local data directory, optionally with its first label flipped."""
    from loralib.data import bundled_data_dir

    folder = tmp_path / "data" / "glue" / "sst2"
    shutil.copytree(bundled_data_dir() / "glue" / "sst2", folder)
    if flip_first_label:
        rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        rows[0]["label"] = 1 - rows[0]["label"]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def test_a_finished_run_on_rows_that_changed_since_is_not_reused(tmp_path):
    from loralib.data import data_fingerprint

    data = _local_sst2(tmp_path)
    kw = dict(epochs=1, warmup_epochs=0.5, progress=False, data_dir=str(data))
    done = run_task("sst2", "smoke", output_dir=tmp_path / "out", **kw)
    assert done["data_fingerprint"] == data_fingerprint("sst2", data) == data_fingerprint("sst2", "bundled")
    assert run_task("sst2", "smoke", output_dir=tmp_path / "out", **kw)["skipped"] is True  # same rows
    _local_sst2(tmp_path / "again", flip_first_label=True)
    shutil.rmtree(data)
    shutil.copytree(tmp_path / "again" / "data", data)  # one label differs: another run
    assert data_fingerprint("sst2", data) != done["data_fingerprint"]
    with pytest.raises(ResultsExistError, match="data_fingerprint: finished run"):
        run_task("sst2", "smoke", output_dir=tmp_path / "out", **kw)
    # A results file from before fingerprints (none recorded) on bundled rows is not reused either.
    path = tmp_path / "out" / "sst2" / "results.json"
    old = json.loads(path.read_text())
    del old["data_fingerprint"]
    path.write_text(json.dumps(old))
    with pytest.raises(ResultsExistError, match="data_fingerprint: finished run None"):
        run_task("sst2", "smoke", output_dir=tmp_path / "out", **kw)


def test_the_fingerprint_covers_local_and_bundled_rows_only():
    from loralib.data import data_fingerprint

    assert data_fingerprint("sst2", None) is None and data_fingerprint("sst2", "") is None  # the hub
    words, noisy = data_fingerprint("sst2", "bundled-words"), data_fingerprint("sst2", "bundled-noisy")
    assert len({words, noisy, data_fingerprint("sst2", "bundled")}) == 3 and len(words) == 16
    assert data_fingerprint("squad_v2", "bundled") != data_fingerprint("squad", "bundled")
    with pytest.raises(ValueError, match="holds only"):
        data_fingerprint("rte", "bundled-words")
    from loralib.benchmark.config import make_config

    assert "data_fingerprint" not in run_identity(make_config("sst2", "gpu"), "gpu")  # hub runs: unchanged
    assert run_identity(make_config("sst2", "smoke"), "smoke")["data_fingerprint"] == data_fingerprint(
        "sst2", "bundled"
    )
