"""Downloads into a local cache that a crash, a cut connection or a second process cannot corrupt.

`download(url, dest)` returns `dest` holding the complete file:

- the bytes go to `<dest>.part`, renamed onto `dest` only once complete, so `dest` is never truncated;
- a cut connection is resumed with an HTTP Range request from the size of the `.part` file, within the
  call (`retries`) and by the next call. `If-Range` carries the server's ETag (or Last-Modified) of
  the first response, so a file that changed on the server in between starts over instead of being
  spliced from two versions;
- processes fetching the same file take turns on `<dest>.lock` (flock); the second one finds the
  first one's file;
- the sha256 of the completed file is kept in `<dest>.sha256` (sha256sum's format) and checked each
  time the file is reused: a cached file that no longer matches is downloaded again, with a warning.
  Give `sha256=` when the publisher states a checksum: the download must then match it.

The cache root is `$ZOO_CACHE`, else `~/.cache/zoo` (`cache_dir`). POSIX only (fcntl).
"""
from __future__ import annotations

import fcntl
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from zoo.files import atomic_write_text, fsync_path, sha256_of

__all__ = ["cache_dir", "download"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def cache_dir(kind: str) -> Path:
    """Where zoo keeps downloads of one kind: `$ZOO_CACHE/<kind>`, else `~/.cache/zoo/<kind>`."""
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo").expanduser() / kind


class _Interrupted(Exception):
    """A failure worth retrying: the transfer stopped early or the server failed for now."""


# What a dropped or refused connection raises; HTTP errors (a URLError too) are sorted out in _fetch.
_RETRY = (_Interrupted, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def download(url: str, dest: str | Path, *, sha256: str | None = None, retries: int = 3,
             timeout: float = 60.0) -> Path:
    """Fetches `url` into `dest` unless `dest` is already there and matches its recorded sha256.

    Raises FileNotFoundError (the server answers 4xx, naming the URL and status), PermissionError
    (the folder of `dest` cannot be written), ConnectionError (still failing after `retries` retries;
    the `.part` file stays, so the next call resumes) or ValueError (the file does not match `sha256`;
    it is deleted)."""
    dest = Path(dest)
    if _problem(dest, sha256) is None:  # reading a verified cache needs no write access
        return dest
    part, lock = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".lock")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock, "a")  # noqa: SIM115 - entered below, once its failure is named
    except OSError as e:
        raise PermissionError(f"cannot write to the cache folder {str(dest.parent)!r} ({e.strerror or e})") from None
    with lock_file:  # closing it releases the lock
        if not _take_lock(lock_file):
            log.info("waiting for another process that is downloading %s", dest)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        problem = _problem(dest, sha256)  # again: the other process may have finished it meanwhile
        if problem is None:
            return dest
        if problem:
            log.warning("%s; downloading it again", problem)
        _sidecar(dest).unlink(missing_ok=True)
        for attempt in range(retries + 1):
            try:
                # a warning, as for other slow one-time work: the CLI shows no INFO records
                log.warning("downloading %s to %s%s", url, dest,
                            f" (resuming after {part.stat().st_size} bytes)" if part.is_file() else "")
                _fetch(url, part, timeout)
                break
            except _RETRY as e:
                reason = getattr(e, "reason", e)  # a URLError's own message is "<urlopen error ...>"
                kept = part.stat().st_size if part.is_file() else 0
                if attempt == retries:
                    resume = f"; {kept} bytes are kept in {part}, run again to resume" if kept else ""
                    raise ConnectionError(f"cannot download {url}: {reason}{resume}") from None
                log.warning("download of %s stopped (%s); retrying", url, reason)
                time.sleep(min(2 ** attempt, 30))
        digest = sha256_of(part)
        if sha256 and digest != sha256.lower():
            part.unlink()
            raise ValueError(f"the file downloaded from {url} has sha256 {digest}, not the expected {sha256}; "
                             "it was deleted")
        fsync_path(part)
        os.replace(part, dest)
        fsync_path(dest.parent)  # makes the rename itself durable
        atomic_write_text(_sidecar(dest), f"{digest}  {dest.name}\n")
        _validator(part).unlink(missing_ok=True)
    return dest


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _validator(part: Path) -> Path:
    """Holds the ETag or Last-Modified of the response `part` started from (for If-Range)."""
    return part.with_name(part.name + ".validator")


def _problem(dest: Path, expected: str | None) -> str | None:
    """None when `dest` hashes to `expected`, else to the sha256 recorded beside it; otherwise what is
    wrong with it ("" when it does not exist)."""
    if not dest.is_file():
        return ""
    sidecar = _sidecar(dest)
    recorded = sidecar.read_text().split()[:1] if sidecar.is_file() else []
    want = (expected or "".join(recorded)).lower()
    if not want:
        return f"{dest} has no recorded sha256 (an interrupted download, or a file put there by hand)"
    digest = sha256_of(dest)
    if digest != want:
        return f"{dest} has sha256 {digest}, not the {'expected' if expected else 'recorded'} {want}"
    return None


def _take_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _fetch(url: str, part: Path, timeout: float) -> None:
    """One request: appends the rest of the file to `part` (206 to a Range request), or rewrites `part`
    with the whole file (200: a first request, a server that ignores Range, or a changed file)."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "zoo"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if _validator(part).is_file():
            headers["If-Range"] = _validator(part).read_text()
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # `part` is not shorter than the file on the server: it is no prefix of it
            part.unlink()
            raise _Interrupted("the partial file does not match the server's; starting over") from None
        if e.code >= 500 or e.code == 429:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise FileNotFoundError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    with response:
        if response.status == 206:
            found = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not found or int(found[1]) != have:
                part.unlink()
                raise _Interrupted(f"the server resumed at a different byte ({response.headers.get('Content-Range')})")
            total, mode = (int(found[2]) if found[2] != "*" else None), "ab"
        else:
            length = response.headers.get("Content-Length")
            total, mode = (int(length) if length else None), "wb"
        with open(part, mode) as out:
            if mode == "wb":  # the validator changes only once `part` is emptied, so they never disagree
                validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                if validator:
                    _validator(part).write_text(validator)
                else:
                    _validator(part).unlink(missing_ok=True)
            shutil.copyfileobj(response, out, CHUNK)
    size = part.stat().st_size
    if total is not None and size != total:  # http.client returns a short body without raising
        raise _Interrupted(f"the connection closed after {size} of {total} bytes")
