"""Crash-safe files: a kill at any moment leaves either the previous or the new complete file."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"  # temporary files are named .<name>.tmp-<pid> beside their target


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Opens a temporary file beside `path` (same directory, so the same filesystem whatever TMPDIR
    says); on success it is flushed to disk and renamed over `path` atomically, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)  # makes the rename itself durable


def fsync_path(path: str | Path) -> None:
    """Flushes a file's or a directory's (its entries: renames) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str | Path) -> str:
    """The file's sha256, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_stray_temp_files(folder: str | Path) -> list[Path]:
    """Deletes the temporary files that writers killed mid-write left in `folder`; returns them."""
    stray = [p for p in Path(folder).glob(f".*{TEMP_MARK}*") if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray
