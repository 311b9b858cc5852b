"""How one file arrives: atomically, capped in size, verified, or not at all.

:func:`fetch` downloads a URL into a temporary ``.NAME.*.part`` file beside the target (so
that ``os.replace`` is an atomic rename), stops past ``max_bytes``, checks what arrived against
its SHA-256 before the rename, and removes the ``.part`` file whatever happens: the target is
absent, the old file, or all of the verified new bytes, even after an error or Ctrl-C.
:func:`remove_stale_parts` deletes the ``.part`` files of downloads that were killed, and
:func:`made_dirs` creates the destination and removes it again when the download fails.
Which files, from where, with which checksums and size cap is :func:`bnref.data.download`'s
business (its messages speak of Fashion-MNIST: this module serves it, and
:class:`DownloadError` is re-exported there). Standard library only; tqdm when fetching.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

TIMEOUT_S = 60.0  # per blocking socket operation, not per file


class DownloadError(OSError):
    """A transfer failed (no connection, HTTP error, or fewer bytes than announced)."""


def fetch(url: str, target: Path, sha256: str, progress: bool, *, digest: Callable[..., str], max_bytes: int) -> None:
    """Download ``url`` to ``target`` atomically: all verified bytes or no file at all. At most
    ``max_bytes`` are received, and ``digest(path, name=url)`` of what arrived (bnref.data's
    ``decompressed_sha256``: streamed, capped) must be ``sha256``, else ``ValueError``."""
    from tqdm import tqdm  # lazy: only downloads need it

    # The temp file lives beside the target so os.replace is an atomic rename.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length is not None else None
                    received = 0
                    if expected is not None and expected > max_bytes:
                        raise DownloadError(f"{url}: announces {expected} bytes; no Fashion-MNIST file is that large")
                    with tqdm(total=expected, desc=target.name, unit="B", unit_scale=True,
                              unit_divisor=1024, disable=not progress) as bar:  # fmt: skip
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                            if received > max_bytes:
                                raise DownloadError(f"{url}: more than {max_bytes} bytes; no Fashion-MNIST file is that large")
            except urllib.error.HTTPError as e:
                e.close()  # an HTTPError holds the open response
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            except urllib.error.URLError as e:
                raise DownloadError(f"{url}: {e.reason}") from e
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: {e!r}") from e
            # http.client returns a short body without complaint when the server closes
            # early, so compare with Content-Length ourselves.
            if expected is not None and received != expected:
                raise DownloadError(f"{url}: transfer incomplete, received {received} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())  # the rename must never expose unwritten data
        found = digest(tmp, name=url)  # streamed, capped: no gzip bomb inflates in memory
        if found != sha256:
            raise ValueError(
                f"{url}: checksum mismatch: SHA-256 of the decompressed content is {found}, "
                f"expected {sha256}; the file was discarded"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a data directory may be shared
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful os.replace


@contextlib.contextmanager
def made_dirs(dest: Path):
    """``mkdir -p dest`` around the block that fills it: when the block fails (an error, Ctrl-C),
    the directories made here are removed again, innermost first, as far as they are empty."""
    made = _make_dirs(dest)
    try:
        yield dest
    except BaseException:
        for d in reversed(made):  # a failed download leaves no empty directory tree behind
            try:
                d.rmdir()  # only if still empty: a file that did arrive is kept
            except OSError:
                break
        raise


def _make_dirs(dest: Path) -> list[Path]:
    """``mkdir -p dest``; returns the directories it made, outermost first."""
    missing = []
    d = dest
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    dest.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


#: a ``.part`` file untouched this long belongs to a download that was killed (a live one writes
#: every few seconds, and every read times out after TIMEOUT_S)
STALE_PART_S = 10 * TIMEOUT_S


def remove_stale_parts(dest: Path, names: Iterable[str]) -> None:
    """Delete the temporary ``.NAME.*.part`` files of downloads that were killed (SIGKILL runs no
    ``finally``): left alone they would stay forever."""
    import time

    now = time.time()
    for name in names:
        for part in dest.glob(f".{name}.*.part"):
            try:
                if now - part.lstat().st_mtime > STALE_PART_S:
                    part.unlink()
            except OSError:
                pass  # another process removed it, or it is not ours to remove
