"""Files that are never half-written and never read half-old: atomic writes of a file or a whole directory,
and reading several files of a directory as one version of it.

Covers:
- `atomic_write`: a file produced on a temporary sibling, flushed, then renamed into place.
- `atomic_directory`: a directory written into a staging sibling that replaces it whole (one
  `renameat2(RENAME_EXCHANGE)` on Linux, two renames elsewhere). Any path works: ".", a relative path,
  a name near the file system's 255-byte limit (the staging name is kept short). An existing
  directory keeps its permissions (a private adapter folder stays private); a new one gets the
  umask's. Errors name the path the caller gave, never a staging name. A process whose working
  directory is the one replaced stays in it.
- `read_files`: the named files of a directory, read through one directory handle, so that a read that
  overlaps an `atomic_directory` save returns the old version or the new one whole, never the config
  of one with the tensors of the other.
- `safetensors_from_bytes`: tensors and metadata of a .safetensors file read that way.
Not here: what adapters contain (`loralib.adapters`, `loralib.peft_interop`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# A staging sibling's name: "." + at most this much of the target's name + mkdtemp's random part.
_STAGE_NAME_CHARS = 64


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage_prefix(path: Path) -> str:
    return f".{path.name[:_STAGE_NAME_CHARS]}."


@contextlib.contextmanager
def _naming(path: Path, what: str) -> Iterator[None]:
    """Re-raise an OSError about a staging name as one about `path`, the caller's path."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and Path(str(e.filename)).name.startswith(_stage_prefix(path)[:-1]):
            raise type(e)(e.errno, f"{e.strerror}: cannot {what} {path}", str(path)) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Produce `path` by calling `write(tmp)` on a temporary sibling, then renaming it into place.

    A crash or exception never leaves a half-written `path`: the old file (if any) stays intact and
    the temporary is removed. An existing file keeps its permissions; a new one gets the umask's
    (mkstemp alone would make it private). It is flushed to disk before the rename, so a power cut
    cannot leave the new name pointing at nothing.
    """
    path = Path(os.path.abspath(path))
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    with _naming(path, "write"):
        fd, tmp = tempfile.mkstemp(prefix=_stage_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with _naming(path, "write"):
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory as one atomic unit: yield an empty staging directory, then put it in place.

    Fill the yielded directory; when the block ends without an exception, it replaces `path` whole.
    A crash or exception at any point leaves the previous `path` complete (never new files beside old
    ones) and removes the staging directory. Entries of the previous `path` that the new write does
    not produce are carried over (hard links), as a plain save into an existing folder would keep them.
    On Linux the swap is one `renameat2(RENAME_EXCHANGE)`; where that is missing, the old directory is
    renamed aside and the new one into place, and the old one is deleted only after that.
    """
    given = path
    path = Path(os.path.abspath(path))  # ".", "adapter/..", relative paths: a name to swap
    if path.is_symlink():  # write where the link points; swapping would replace the link itself
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{given} exists and is a file; choose a directory path for the save.")
    if path.parent == path:
        raise ValueError(f"cannot replace the root directory {given}; save into a folder below it.")
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o777 & ~_umask()
    with _naming(path, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield stage
        # Only what this write produced: carried-over entries are hard links to files that are already
        # on disk, and a chmod of a link would change the owner's original.
        _fsync_tree(stage, mode)
        if path.exists():
            for entry in path.iterdir():
                if not (stage / entry.name).exists():
                    _link_tree(entry, stage / entry.name)
        inside = _cwd_inside(path)
        with _naming(path, "replace"):
            _swap_into_place(stage, path)
        if inside is not None:  # the old directory moved to the staging name: follow the path instead
            os.chdir(path / inside)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after a swap it holds the previous contents


def _cwd_inside(path: Path) -> Path | None:
    """The working directory relative to `path` when it is `path` or inside it, else None."""
    try:
        cwd = Path(os.getcwd())
    except FileNotFoundError:
        return None
    try:
        return cwd.relative_to(path)
    except ValueError:
        return None


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _fsync_tree(root: Path, mode: int) -> None:
    """Give the staging root the directory's mode, the files the umask's (mkstemp makes private ones),
    and flush them."""
    os.chmod(root, mode)
    file_mode = 0o666 & ~_umask()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            f = os.path.join(dirpath, name)
            if os.path.islink(f):
                continue
            os.chmod(f, file_mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@functools.cache
def _renameat2():
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _swap_into_place(stage: Path, path: Path) -> None:
    """Put `stage` at `path`; afterwards `stage` holds what `path` held (or is gone)."""
    if not path.exists():
        os.rename(stage, path)
    else:
        fn = _renameat2()
        at_fdcwd, rename_exchange = -100, 2
        if fn is None or fn(at_fdcwd, os.fsencode(stage), at_fdcwd, os.fsencode(path), rename_exchange) != 0:
            # No atomic exchange here (old kernel, other OS, filesystem without it): two renames. A crash
            # between them leaves the previous directory complete under the aside name.
            aside = Path(tempfile.mkdtemp(prefix=_stage_prefix(path), suffix=".old", dir=path.parent))
            os.rmdir(aside)
            os.rename(path, aside)
            os.rename(stage, path)
            os.rename(aside, stage)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_files(directory: str | os.PathLike, names: Sequence[str], tries: int = 5) -> dict[str, bytes | None]:
    """{name: contents, or None where the file does not exist} of one version of `directory`.

    Every file is opened through one handle on the directory: a concurrent `atomic_directory` save
    swaps directories, so the handle keeps seeing the version it was opened on. If that version is
    deleted while being read (the save's clean-up), the read starts again on the new one.
    """
    directory = Path(directory)
    for _ in range(tries):
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            out: dict[str, bytes | None] = {}
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
                except FileNotFoundError:
                    out[name] = None
                    continue
                with os.fdopen(fd, "rb") as f:
                    out[name] = f.read()
            try:
                swapped = os.fstat(dfd).st_ino != os.stat(directory).st_ino
            except FileNotFoundError:  # between the two renames of a save without renameat2
                swapped = True
        finally:
            os.close(dfd)
        if not (swapped and any(v is None for v in out.values())):
            return out
    return out


def safetensors_from_bytes(data: bytes, source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file's bytes; ValueError naming `source` if it is corrupt."""
    from safetensors.torch import load

    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # struct.error, JSON, SafetensorError: all mean the file is not whole
        raise ValueError(
            f"{source} is not a readable safetensors file ({e}); it is corrupt or truncated: re-save it."
        ) from None
    return tensors, metadata
