"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a resumed job) never sees a half-written CSV, JSON or tensor file, even after kill -9.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import xxhash

from crosslayer.errors import CrosslayerError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds. The file
    gets the mode a plain ``open`` would give it (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``/proc/self/status``),
    so that threads writing files meanwhile are not affected."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def write_csv(frame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return _hash_file(path, hashlib.sha256())


def xxh3_file(path: str | Path) -> str:
    """Hex XXH3-128 of a file: a fast (about 10x SHA-256 here), non-cryptographic checksum that catches
    flipped bits and truncation, for the checks every reader makes."""
    return _hash_file(path, xxhash.xxh3_128())


def _hash_file(path: str | Path, digest) -> str:
    """Hex digest of a file, read into one reused 4 MB buffer (no fresh allocation per block: that
    halves the time of a page-cached read)."""
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _plain(obj):
    """``obj`` as JSON would give it back (tuples become lists), for comparing plans."""
    return json.loads(json.dumps(obj, default=str))


def claim_folder(out: str | Path, plan: dict, *, record: str, what: str, extra: dict | None = None,
                 defaults: dict | None = None) -> dict | None:
    """Make folder ``out`` the home of the job described by ``plan``: the one way every resumable job
    (harvest, SAE and crosscoder training, reproduction) decides between start, resume and refuse.

    - ``out/record`` exists and agrees with ``plan`` on every key of ``plan``: resume; return that record.
    - ``out/record`` exists and differs: refuse, naming the first differing key and both values.
    - ``out`` is missing or an empty folder: create it, write ``{**plan, **extra}`` to ``out/record``
      atomically, return None (a new job).
    - ``out`` is a file, or a non-empty folder without ``record``: refuse.
    - Another live process holds ``out`` (:func:`lock_folder`): refuse, naming it. On resume, the stale
      temporaries of a killed run are swept (:func:`sweep_temporaries`).
    - ``defaults``: ``{plan key: {field: value}}`` for fields added to a nested part of the plan after folders
      were written; a record lacking such a field is compared as if it held that value.
    Every refusal is a one-line :class:`CrosslayerError` that names the folder and the fix, and leaves
    no folder this call created.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrosslayerError(f"{out} is a file, not a folder; choose another output folder")
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    _refuse_foreign(out, record, what)  # before the lock: a foreign folder gets no lock file
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_folder(out)
        return _claim_locked(out, plan, record=record, what=what, extra=extra, defaults=defaults or {})
    except OSError as err:
        _undo_claim(out, created)
        raise CrosslayerError(f"cannot write to {out} ({err.strerror or err}); choose a writable folder") from None
    except CrosslayerError:
        _undo_claim(out, created)
        raise


def _claim_locked(out: Path, plan: dict, *, record: str, what: str, extra: dict | None, defaults: dict) -> dict | None:
    path = out / record
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CrosslayerError(f"{path} cannot be read ({type(err).__name__}); delete {out} and run the "
                                  "command again") from None
        wanted = _plain(plan)
        seen = {key: {**_plain(defaults[key]), **existing[key]} if isinstance(existing.get(key), dict) and key in defaults
                else existing.get(key) for key in wanted}
        diff = [key for key in wanted if seen[key] != wanted[key]]
        if diff:
            key, there, now = diff[0], seen[diff[0]], wanted[diff[0]]
            if isinstance(there, dict) and isinstance(now, dict):  # name the first differing field inside it
                sub = next(k for k in [*now, *there] if there.get(k) != now.get(k))
                key, there, now = f"{key}.{sub}", there.get(sub), now.get(sub)
            raise CrosslayerError(f"{out} holds a different {what} ({key}: {_short(there)} there, "
                                  f"{_short(now)} now); choose another output folder or delete that one")
        sweep_temporaries(out)
        return existing
    _refuse_foreign(out, record, what)
    write_json({**plan, **(extra or {})}, path)
    return None


def _refuse_foreign(out: Path, record: str, what: str) -> None:
    """Refuse a folder that holds something other than a lock file, but no ``record``."""
    if out.is_dir() and not (out / record).exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        article = "an" if what[:1] in "aeiou" else "a"
        raise CrosslayerError(f"{out} exists and is not {article} {what} folder (no {record}); choose an empty or "
                              "new folder")


def _undo_claim(out: Path, created: Path | None) -> None:
    """After a refused claim, remove the folders this call created (``out`` holds at most the lock file)."""
    release_folder(out)
    if created is not None and out.is_dir() and all(p.name == LOCK_FILE for p in out.iterdir()):
        shutil.rmtree(created, ignore_errors=True)


# ----------------------------------------------------------------------------- one writer per folder
LOCK_FILE = ".lock"
"""Every claimed folder holds this file; a writer holds an exclusive ``flock`` on it while it runs."""
_HELD: dict[str, int] = {}
"""Resolved folder -> open descriptor of its lock file, for the folders this process holds."""


def lock_folder(out: Path) -> None:
    """Take the exclusive lock on folder ``out`` for this process (kept until :func:`release_folder` or
    the process's exit; taking it again is a no-op). The kernel drops the lock of a process that dies
    (kill -9 included), so a stale lock is taken over without any check. Another live writer: refuse,
    naming it (the lock file holds its pid, host and start time)."""
    key, path = str(out.resolve()), out / LOCK_FILE
    held = _HELD.get(key)
    if held is not None:
        if path.exists() and os.fstat(held).st_ino == path.stat().st_ino:
            return
        release_folder(out)  # the folder was deleted and made again under us
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CrosslayerError(f"{out} is being written by {holder}; wait for it to finish or stop it, then run "
                              "the command again") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%H:%M:%S')})".encode())
    _HELD[key] = fd


def release_folder(out: str | Path) -> None:
    """Drop this process's lock on ``out`` (the lock file stays: deleting it would let two writers lock
    two different files)."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


def sweep_temporaries(out: Path) -> None:
    """Delete the temporary files (``.*.tmp`` of :func:`atomic_path`) a killed run of this folder's job
    left behind; subfolders with a lock file of their own are other jobs' and are left to them. Call it
    only holding the folder's lock, so no live writer's temporaries are deleted."""
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not (Path(root) / d / LOCK_FILE).exists()]
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                (Path(root) / name).unlink(missing_ok=True)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
