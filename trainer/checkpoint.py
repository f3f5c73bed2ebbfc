"""Checkpoint folders on disk: written atomically, verified by a manifest, never unpickled.

A checkpoint is a folder `step_<N:07d>/` inside a run folder. It is written under a hidden
temporary name, every file and the folder are fsynced, `manifest.json` (sizes and sha256 of
every other file) is written last, and only then is the folder renamed into place. A folder
without a manifest that matches its files is not a checkpoint. Tensors live in safetensors
files and everything else in JSON: loading never calls `torch.load` or `pickle`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError, first_line
from trainer.schema import (
    EMA_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_NAME,
    OPTIMIZER_NAME,
    PROGRESS_NAME,
    RNG_NAME,
    STATE_NAME,
    check_manifest,
    check_state,
)

BEST_LINK = "best"
LOCK_NAME = ".lock"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp-"


def folder_of(path: str | os.PathLike) -> Path:
    """The checkpoint folder a user names: the folder itself (or a `best` link), or the folder of
    its model.safetensors."""
    path = Path(path)
    return path.parent if path.name == MODEL_NAME else path


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(folder: Path) -> int:
    """The step a checkpoint folder is named for (-1 when it is not named like one)."""
    match = STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else -1


# A manifest lists six files: far below this. state.json is read up to the size its manifest gives.
MANIFEST_LIMIT = 1 << 20


def open_regular(path: Path) -> int:
    """A file descriptor for reading `path`, which must be a regular file itself: never a link
    (out of the checkpoint's folder, to /dev/zero), a FIFO (which would block the open) or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as exc:
        kind = "a link" if path.is_symlink() else "unreadable"
        raise CheckpointError(f"{path} is {kind}, not a regular file ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file")
    return fd


def read_bytes(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of the regular file `path`; a longer file is refused, never read whole."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than the {limit} bytes expected")
    return data


def _sha256(path: Path, size: int) -> str:
    """The sha256 of the regular file `path`, which must hold exactly `size` bytes."""
    digest, seen = hashlib.sha256(), 0
    with os.fdopen(open_regular(path), "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise CheckpointError(
                f"{path} has {os.fstat(f.fileno()).st_size} bytes, the manifest says {size} (truncated?)"
            )
        while chunk := f.read(min(1 << 20, size + 1 - seen)):
            seen += len(chunk)
            digest.update(chunk)
        if seen != size:
            raise CheckpointError(f"{path} changed while it was read ({seen} bytes, the manifest says {size})")
    return digest.hexdigest()


def json_document(data: bytes) -> Any:
    """JSON in which a key appears once per object (a repeated key would hide the first value)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(items)
        if len(found) != len(items):
            raise ValueError(f"the key {next(k for i, (k, _) in enumerate(items) if k in dict(items[:i]))!r} repeats")
        return found

    return json.loads(data, object_pairs_hook=pairs)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_lines_atomic(path: Path, rows: list[Any]) -> None:
    """Replaces `path` with one JSON line per row (see write_text_atomic)."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_text_atomic(path: Path, text: str) -> None:
    """Replaces `path` with `text`, so that readers (and a full disk) leave the old file or the new
    one, never half of one."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_user_made(path: Path) -> None:
    """The mode any file the user creates gets (0666 & ~umask); safetensors writes 0600 files."""
    os.chmod(path, 0o666 & ~umask())


class RunLock:
    """One writer per run folder: an exclusive `flock` on `.lock` in it, held while a run writes.

    The OS drops the lock when its process ends in any way, kill -9 included, so a lock is never
    stale; the file stays and names the last holder. Readers (evaluate, predict, plot) never lock.
    """

    # The locks this process holds, by folder: a second Trainer on a folder asks the first to yield.
    _held: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()

    def __init__(self, run_dir: Path, yield_lock: Callable[[], None] | None = None) -> None:
        """`yield_lock`, if given, is called when another lock in this process wants the folder: it
        may release this lock (or keep it)."""
        self.path = run_dir / LOCK_NAME
        self._file: Any = None
        self._made_folder = False
        self._yield_lock = yield_lock

    def acquire(self) -> None:
        import fcntl
        import socket

        key = os.path.realpath(self.path)
        other = RunLock._held.get(key)
        if other is not None and other._file is not None and other._yield_lock is not None:
            other._yield_lock()  # before this lock looks at the folder: yielding may remove it
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if other is not None and other._file is not None:
            self._made_folder = False
            raise CheckpointError(
                f"run folder {self.path.parent} is in use by another Trainer in this process, which is fitting "
                "it; wait for its fit() to end, or choose another run_name"
            )
        file = open(self.path, "a+")  # noqa: SIM115 (held open as long as the lock)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            file.seek(0)
            file.truncate()
            file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            file.flush()
        except BlockingIOError:
            file.seek(0)
            holder = file.read(200).strip() or "another process"
            file.close()
            raise CheckpointError(
                f"run folder {self.path.parent} is in use by another run ({holder}); wait for it to end, "
                "or choose another --run-name"
            ) from None
        except BaseException:
            file.close()
            raise
        self._file = file
        RunLock._held[key] = self

    def release(self) -> None:
        """Closing the file releases the lock (so does the file's garbage collection, or the process's end).
        A run folder this lock made and nothing else wrote to (a refused run) is removed with it."""
        if self._file is not None:
            if self._made_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.path.parent.rmdir()
            self._file.close()
            self._file = None


class SaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, a read-only folder): earlier ones are intact."""


@dataclass
class CheckpointContents:
    """What a checkpoint holds, as it is written and as it is read back."""

    model: dict[str, torch.Tensor]
    model_metadata: dict[str, str]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    progress: dict[str, torch.Tensor]
    state: dict[str, Any]  # JSON: step, epoch, data position, scheduler, optimizer groups, config, history
    ema: dict[str, torch.Tensor]  # the averaged weights (--ema), else empty and no file

    def nbytes(self) -> int:
        """About what the checkpoint takes on disk."""
        tensors = (*self.model.values(), *self.optimizer.values(), *self.rng.values(), *self.progress.values(),
                   *self.ema.values())  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors) + len(json.dumps(self.state)) + 16_384


def describe_write_error(exc: BaseException, what: str, folder: Path, needed: int | None = None) -> str:
    """One line for a failed write: what, where, why, and the space free there (and needed)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        free = f"{_mib(shutil.disk_usage(folder if folder.exists() else folder.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f", one checkpoint needs about {_mib(needed)}" if needed else ""
    return f"could not write {what} in {folder} ({reason}); {free}{need}; earlier checkpoints and logs are intact"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def save(
    run_dir: Path, step: int, contents: CheckpointContents, *, before_commit: Callable[[], None] | None = None
) -> Path:
    """Writes a complete checkpoint for `step` and returns its folder; on failure nothing new remains.

    `before_commit` runs after all files are durable and before the rename (tests use it to fail
    a save half-way).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    if final.exists():
        try:
            verify(final)
            return final  # this step is already saved, completely: never replace a good checkpoint
        except CheckpointError:
            pass  # a broken folder under a checkpoint's name: replaced below
    tmp = run_dir / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_contiguous(contents.model), tmp / MODEL_NAME, metadata=contents.model_metadata)
        save_file(_contiguous(contents.optimizer), tmp / OPTIMIZER_NAME, metadata={"format": "pt"})
        save_file(_contiguous(contents.rng), tmp / RNG_NAME, metadata={"format": "pt"})
        save_file(_contiguous(contents.progress), tmp / PROGRESS_NAME, metadata={"format": "pt"})
        tensor_files = [MODEL_NAME, OPTIMIZER_NAME, RNG_NAME, PROGRESS_NAME]
        if contents.ema:
            save_file(_contiguous(contents.ema), tmp / EMA_NAME, metadata={"format": "pt"})
            tensor_files.append(EMA_NAME)
        for name in tensor_files:
            _as_user_made(tmp / name)
        with open(tmp / STATE_NAME, "w") as f:
            json.dump(contents.state, f, indent=1)
        files = {}
        for name in (*tensor_files, STATE_NAME):
            _fsync_file(tmp / name)
            size = (tmp / name).stat().st_size
            files[name] = {"size": size, "sha256": _sha256(tmp / name, size)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": contents.state["world_size"],
            "files": files,
        }
        with open(tmp / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if before_commit is not None:
            before_commit()
        if final.exists():  # broken (checked above): not a checkpoint, so nothing is lost
            discard(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(describe_write_error(exc, f"checkpoint {final.name}", run_dir, contents.nbytes())) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def verify(folder: Path) -> dict[str, Any]:
    """Checks a checkpoint folder against its manifest; returns the manifest or raises CheckpointError.

    The manifest lists exactly the files of a checkpoint (EMA's only with --ema), each a regular
    file of the listed size and sha256; nothing else in the folder is ever read."""
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if not os.path.lexists(manifest_path):
        raise CheckpointError(f"{manifest_path} is missing: the save never completed")
    data = read_bytes(manifest_path, MANIFEST_LIMIT)
    try:
        manifest = json_document(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({first_line(exc)})") from None
    check_manifest(folder, manifest)
    for name, expected in manifest["files"].items():
        if _sha256(folder / name, expected["size"]) != expected["sha256"]:
            raise CheckpointError(f"{folder / name} fails its sha256 check (corrupted)")
    return manifest


def read_state(folder: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """state.json of a checkpoint folder (verified here unless its `manifest` is given), checked
    against the schema; the manifest lists the EMA's weights exactly when the run has an EMA."""
    manifest = verify(folder) if manifest is None else manifest
    path = folder / STATE_NAME
    try:
        state = json_document(read_bytes(path, manifest["files"][STATE_NAME]["size"]))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    config = check_state(folder, state)
    if (EMA_NAME in manifest["files"]) != (config.ema is not None):
        has = "lists" if EMA_NAME in manifest["files"] else "does not list"
        raise CheckpointError(f"{folder / MANIFEST_NAME} {has} {EMA_NAME}, and the run has ema={config.ema}")
    return state


def load(folder: Path) -> CheckpointContents:
    """Verifies and reads a checkpoint folder (safetensors and JSON only)."""
    manifest = verify(folder)
    state = read_state(folder, manifest)
    try:
        with safe_open(folder / MODEL_NAME, framework="pt") as st:
            metadata = st.metadata() or {}
        return CheckpointContents(
            model=load_file(folder / MODEL_NAME),
            model_metadata=metadata,
            optimizer=load_file(folder / OPTIMIZER_NAME),
            rng=load_file(folder / RNG_NAME),
            progress=load_file(folder / PROGRESS_NAME),
            ema=load_file(folder / EMA_NAME) if EMA_NAME in manifest["files"] else {},
            state=state,
        )
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {folder}: {first_line(exc)}") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Folders named like checkpoints, newest step first (not yet verified)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_latest(run_dir: Path, warn: Callable[[str], None] = lambda _: None) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are reported through `warn`."""
    for folder in list_checkpoints(run_dir):
        try:
            verify(folder)
        except CheckpointError as exc:
            warn(f"skipping broken checkpoint: {exc}")
            continue
        return folder
    return None


def discard(folder: Path) -> None:
    """Deletes a checkpoint folder without ever leaving a half-deleted one under its name: it is
    renamed to a temporary name first (one atomic step), then removed. A kill during the removal
    leaves a temporary folder, which `remove_stale_temporaries` clears on the next start."""
    doomed = folder.with_name(f"{TMP_PREFIX}deleted-{folder.name}.{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Deletes half-written folders left by a save that was killed."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def update_best(run_dir: Path, folder: Path) -> None:
    """Points the `best` link at `folder` atomically."""
    link = run_dir / BEST_LINK
    tmp = run_dir / f"{TMP_PREFIX}{BEST_LINK}.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(folder.name, tmp)
    os.replace(tmp, link)
    _fsync_dir(run_dir)


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` complete checkpoints and the `best` one.

    Only complete checkpoints count and are deleted, so at least one complete one always remains.
    """
    complete = []
    for folder in list_checkpoints(run_dir):
        try:
            verify(folder)
        except CheckpointError:
            continue
        complete.append(folder)
    link = run_dir / BEST_LINK
    best = (run_dir / os.readlink(link)).resolve() if link.is_symlink() else None
    removed = []
    for folder in complete[max(keep_last, 1) :]:
        if best is not None and folder.resolve() == best:
            continue
        discard(folder)
        removed.append(folder)
    return removed
