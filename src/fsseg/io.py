"""The one way fsseg writes a result or cache file: atomically, and with a readable error when it cannot.

``write_atomic(path, data)`` writes to a temporary file in the same folder, fsyncs it and renames it over
``path`` (``os.replace``), so a reader - or a run resumed after a crash, a kill -9 or a full disk - finds the
old file, no file, or the complete new one, never a partial file under the final name. A full disk, a
read-only folder or a missing permission becomes an :class:`fsseg.errors.OutputError` naming the folder, the
free space and the space the file needs. Every writer of a run directory (metrics.json, config.yaml,
provenance.json, checkpoints through :class:`fsseg.callbacks.AtomicCheckpointIO`, csv/metrics.csv) and of the caches goes
through here; ``sha256_bytes`` / ``stable_key`` are the hashers of the cache keys.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fsseg.errors import OutputError

__all__ = ["sha256_bytes", "stable_key", "write_atomic", "write_text_atomic"]

# errors that mean "this folder cannot take the file", as opposed to a bug
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def output_error(path: Path, err: OSError, needed: int) -> OutputError:
    """One line naming the folder, the reason, the free space and the space needed."""
    folder = path.parent
    try:
        free = _mb(shutil.disk_usage(folder if folder.exists() else folder.parent).free)
    except OSError:
        free = "unknown"
    reason = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
    why = reason.get(err.errno, err.strerror or str(err))
    return OutputError(
        f"cannot write {path.name} in {folder}: {why} ({free} free, {_mb(needed)} needed); "
        "free some space or choose another output folder (hydra.run.dir=...)"
    )


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a fsynced temp file in the same folder + ``os.replace``.

    On any failure the temp file is removed and ``path`` is left as it was (absent or the old content); a full
    disk or an unwritable folder is an ``OutputError`` (one line, see the module docstring).
    """
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if err.errno in _OUTPUT_ERRNOS:
            raise output_error(path, err, len(blob)) from err
        raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; best effort (not possible on every OS / file system)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_key(obj: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (cache keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode("utf-8"))[:length]
