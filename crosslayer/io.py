"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a resumed job) never sees a half-written CSV, JSON or tensor file, even after kill -9.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
    """Hex SHA-256 of a file, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(obj):
    """``obj`` as JSON would give it back (tuples become lists), for comparing plans."""
    return json.loads(json.dumps(obj, default=str))


def claim_folder(out: str | Path, plan: dict, *, record: str, what: str, extra: dict | None = None) -> dict | None:
    """Make folder ``out`` the home of the job described by ``plan``: the one way every resumable job
    (harvest, SAE and crosscoder training, reproduction) decides between start, resume and refuse.

    - ``out/record`` exists and agrees with ``plan`` on every key of ``plan``: resume; return that record.
    - ``out/record`` exists and differs: refuse, naming the first differing key and both values.
    - ``out`` is missing or an empty folder: create it, write ``{**plan, **extra}`` to ``out/record``
      atomically, return None (a new job).
    - ``out`` is a file, or a non-empty folder without ``record``: refuse.
    Every refusal is a one-line :class:`CrosslayerError` that names the folder and the fix.
    """
    out = Path(out)
    path = out / record
    if out.exists() and not out.is_dir():
        raise CrosslayerError(f"{out} is a file, not a folder; choose another output folder")
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CrosslayerError(f"{path} cannot be read ({type(err).__name__}); delete {out} and run the "
                                  "command again") from None
        wanted = _plain(plan)
        diff = [key for key in wanted if existing.get(key) != wanted[key]]
        if diff:
            key = diff[0]
            raise CrosslayerError(f"{out} holds a different {what} ({key}: {_short(existing.get(key))} there, "
                                  f"{_short(wanted[key])} now); choose another output folder or delete that one")
        return existing
    if out.is_dir() and any(out.iterdir()):
        article = "an" if what[:1] in "aeiou" else "a"
        raise CrosslayerError(f"{out} exists and is not {article} {what} folder (no {record}); choose an empty or "
                              "new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json({**plan, **(extra or {})}, path)
    except OSError as err:
        raise CrosslayerError(f"cannot write to {out} ({err.strerror or err}); choose a writable folder") from None
    return None


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
