"""What makes two benchmark runs the same run, checked before a run resumes a checkpoint or reuses results.

A run's identity is every setting that changes its numbers: the profile and every `TrainConfig` field
except the few that only change how it runs (`NOT_IDENTITY`: progress bars, loader workers, CPU
threads, the evaluation batch size). Resuming compares the checkpoint's identity with the new run's and
refuses any difference with the names and both values, except `RESUMABLE` changes (more epochs: the run
is extended, and results.json records the change under "resumed"). Reusing a finished run compares all
of it, epochs included.

Checkpoints: after the Trainer writes `checkpoint-<step>/`, `CheckpointManifest` (a TrainerCallback)
writes `loralib_run.json` into it last (the identity, the epoch, and each file's size and SHA-256) and
only then deletes the older checkpoints, so a save cut short (a Colab disconnect) never leaves no
complete checkpoint behind. `usable_checkpoint` returns the newest checkpoint whose manifest and files
agree, says which ones it skipped and why, and names them in the error when none is left.

Covers: `run_identity`, `identity_differences`, `RunMismatchError`, `check_reuse`, `check_resume`,
`CheckpointManifest`, `usable_checkpoint`, `CheckpointError`. Not here: the run loop
(`loralib.benchmark.run`), the results file (`loralib.benchmark.results`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from loralib.benchmark.results import ResultsExistError
from loralib.files import atomic_write

MANIFEST_NAME = "loralib_run.json"
MANIFEST_FORMAT = 1
# Settings that change how a run goes, never its numbers.
NOT_IDENTITY = ("progress", "num_workers", "num_threads", "eval_batch_size")
# Settings a resumed run may change, and how: more epochs extend the run (the schedule is re-planned
# over the new total from the resume point on; results.json records it).
RESUMABLE = {"epochs": "more epochs than the checkpoint has finished"}


class RunMismatchError(ResultsExistError):
    """A checkpoint or finished run was made with other settings than the run asked for."""


class CheckpointError(RuntimeError):
    """No complete checkpoint is left to resume from."""


def run_identity(cfg, profile: str, with_data: bool = True) -> dict[str, Any]:
    """{setting: value} for every setting that changes the numbers of a run of `cfg` under `profile`.

    With bundled or local data it also holds "data_fingerprint", the hash of the task's files as they are
    now (`loralib.data.data_fingerprint`): the same settings on changed rows are another run. with_data=False
    leaves it out (a finished run's own fingerprint is the one its results.json recorded)."""
    values = cfg.to_dict()
    out = {"profile": profile}
    # The LoRA config's fields sit beside the others, so a difference names the field itself ("r").
    lora = values.pop("lora", {})
    out.update({k: v for k, v in lora.items() if k != "peft_type"})
    out.update({k: v for k, v in values.items() if k not in NOT_IDENTITY})
    if with_data:
        from loralib.data import data_fingerprint

        fingerprint = data_fingerprint(cfg.task, cfg.data_dir)
        if fingerprint is not None:
            out["data_fingerprint"] = fingerprint
    return json.loads(json.dumps(out, default=str))  # the form it has once written to JSON


def identity_differences(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (recorded value, value now)} where the two identities differ (a missing key counts)."""
    keys = [k for k in now if k not in NOT_IDENTITY] + [k for k in recorded if k not in now]
    missing = object()
    diffs = {}
    for k in keys:
        a, b = recorded.get(k, missing), now.get(k, missing)
        if a != b:
            diffs[k] = (None if a is missing else a, None if b is missing else b)
    return diffs


def _describe(diffs: dict[str, tuple[Any, Any]], what: str) -> str:
    return "; ".join(f"{k}: {what} {a!r}, now {b!r}" for k, (a, b) in diffs.items())


def check_reuse(existing: dict[str, Any], cfg, profile: str, path: Path) -> None:
    """Refuse to return the finished run in `existing` (a results.json) as the result of another run."""
    from loralib.benchmark.config import config_from_results

    try:
        recorded = run_identity(config_from_results(existing), existing.get("profile"), with_data=False)
    except (KeyError, TypeError, ValueError) as e:
        raise RunMismatchError(
            f"{path} holds a finished run whose settings cannot be read ({e}); pass overwrite=True (CLI "
            "--overwrite) to replace it, or choose another output directory."
        ) from None
    if existing.get("data_fingerprint") is not None:
        recorded["data_fingerprint"] = existing["data_fingerprint"]
    diffs = identity_differences(recorded, run_identity(cfg, profile))
    if diffs:
        raise RunMismatchError(
            f"{path} holds a finished run made with other settings ({_describe(diffs, 'finished run')}). "
            "Pass overwrite=True (CLI --overwrite) to replace it, or choose another output directory."
        )


def check_resume(manifest: dict[str, Any], cfg, profile: str, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume `checkpoint` with settings that would change its numbers; return the allowed
    changes ({setting: (checkpoint's, now)}), which the results record."""
    diffs = identity_differences(manifest.get("identity", {}), run_identity(cfg, profile))
    allowed = {}
    done = manifest.get("epoch") or 0
    for k in list(diffs):
        if k == "epochs" and isinstance(diffs[k][1], int) and diffs[k][1] > done:
            allowed[k] = diffs.pop(k)
    if diffs:
        may = ", ".join(f"{k} ({why})" for k, why in RESUMABLE.items())
        raise RunMismatchError(
            f"--resume: {checkpoint} was made with other settings ({_describe(diffs, 'checkpoint')}). Resume with "
            f"the checkpoint's settings, or start over (resume=False / no --resume discards the checkpoint). "
            f"A resumed run may change: {may}; and, as they never change the numbers, {', '.join(NOT_IDENTITY)}."
        )
    return allowed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(
    checkpoint: Path, identity: dict[str, Any], epoch: int | None, resumed: list[dict[str, Any]] = ()
) -> None:
    """Record the run's identity, its resumes so far and each file's size and hash in `checkpoint` (the
    last file it gets)."""
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(checkpoint).items()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "epoch": epoch,
        "identity": identity,
        "resumed": list(resumed),
        "files": files,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_write(checkpoint / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (cut short, damaged), or None when it is complete."""
    path = checkpoint / MANIFEST_NAME
    if not path.is_file():
        return f"incomplete: it has no {MANIFEST_NAME} (its save was cut short, or an older loralib wrote it)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"damaged: its {MANIFEST_NAME} is unreadable ({e})"
    present = _files(checkpoint)
    for rel, want in files.items():
        p = present.get(rel)
        if p is None:
            return f"incomplete: {rel} is missing"
        if p.stat().st_size != want.get("size"):
            return f"damaged: {rel} has {p.stat().st_size} bytes, {want.get('size')} were written"
        if _sha256(p) != want.get("sha256"):
            return f"damaged: {rel} does not match the hash written with it"
    return None


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST_NAME).read_text())


def checkpoints_newest_first(directory: Path) -> list[Path]:
    """`checkpoint-<step>` folders of `directory` (the Trainer's naming), newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(p.name.split("-", 1)[1]), p) for p in directory.glob("checkpoint-*") if p.is_dir()
             and p.name.split("-", 1)[1].isdigit()]  # fmt: skip
    return [p for _, p in sorted(found, reverse=True)]


def usable_checkpoint(directory: Path, say=print) -> Path | None:
    """The newest complete checkpoint in `directory` (None when there is none at all). Skipped ones are
    reported through `say`; CheckpointError names them when every one is incomplete or damaged."""
    skipped = []
    for ckpt in checkpoints_newest_first(directory):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if skipped:
                say(f"[resume] falling back to {ckpt}: " + "; ".join(f"{p} is {why}" for p, why in skipped))
            return ckpt
        skipped.append((ckpt, problem))
    if skipped:
        raise CheckpointError(
            "cannot resume: no complete checkpoint is left ("
            + "; ".join(f"{p} is {why}" for p, why in skipped)
            + "). Start over without --resume (resume=False), which discards it."
        )
    return None


def manifest_callback(identity: dict[str, Any], resumed: list[dict[str, Any]] = ()):
    """A TrainerCallback that writes the manifest into each new checkpoint, then removes older ones."""
    from transformers import TrainerCallback

    class CheckpointManifest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir)
            new = folder / f"checkpoint-{state.global_step}"
            if not new.is_dir():
                return
            write_manifest(new, identity, round(state.epoch) if state.epoch is not None else None, resumed)
            for old in checkpoints_newest_first(folder):
                if old != new:
                    shutil.rmtree(old, ignore_errors=True)  # the new one is complete: only it is kept

    return CheckpointManifest()
