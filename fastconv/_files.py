"""Atomic file writes: every file fastconv writes (models, checkpoints, ONNX, safetensors, CSV,
downloaded data) goes through here, so a reader sees the old file or the whole new one, never
half of one, whatever happens to this process or the machine mid-write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", **open_options: Any
) -> Iterator[IO[Any]]:
    """Yield a temporary file beside ``path``; when the block ends without error, flush and fsync
    it, give it the usual permissions, rename it over ``path`` and fsync the folder. On any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(os.fspath(path))
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            with suppress(OSError):  # mkstemp makes 0600; give the usual umask-based mode
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders can't be opened."""
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
