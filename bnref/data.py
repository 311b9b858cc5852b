r"""Fashion-MNIST: find, download, verify and read the four IDX files into NumPy.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) is 70,000 grayscale 28x28 images of
Zalando articles in 10 classes, 60,000 for training and 10,000 for testing: MNIST's
shapes and file format with a task that is not solved by a linear model.

The IDX format
--------------
Each of the four files is a gzip-compressed IDX file: a big-endian header, then the
raw data in C (row-major) order::

    offset  bytes  content
    0       4      magic number = 0x0000 | dtype code | number of dimensions
                   2051 = 0x00000803: uint8 (0x08), 3 dims   (images)
                   2049 = 0x00000801: uint8 (0x08), 1 dim    (labels)
    4       4*d    the d dimension sizes, uint32 each: N, 28, 28  or  N
    4+4d    ...    N*28*28 pixels (0 = background, 255 = ink) or N labels 0..9

There is no checksum or end marker inside IDX, so a truncated or mixed-up file would
silently give a wrong array; the readers here check the magic, the image size, the
exact byte length and the label range, and ``load_fashion_mnist`` checks that each
split has as many labels as images. Any failure is a ``ValueError`` naming the file.

Where the data comes from, in search order (see :func:`candidate_dirs`)
----------------------------------------------------------------------
1. an explicit ``data_dir`` argument (``--data-dir``);
2. ``$BNREF_DATA_DIR``;
3. the per-user cache ``$XDG_CACHE_HOME/bnref/fashion-mnist`` (default
   ``~/.cache/bnref/fashion-mnist``), where :func:`download` puts them;
4. ``/usr/share/datasets/fashion-mnist``, installed by Debian's
   ``dataset-fashion-mnist`` package.

Uncompressed copies (the same names without ``.gz``) are accepted too. Alternatively
``source="tfds"`` loads the ``fashion_mnist`` dataset of tensorflow-datasets.

Results: ``images`` uint8 ``(N, 28, 28)``, ``labels`` int64 ``(N,)``, as NumPy
arrays; this module imports neither PyTorch nor JAX. How one file arrives (atomically, capped,
verified, its ``.part`` files cleaned up) is :mod:`bnref._download`'s; the tfds source is
:mod:`bnref._tfds`'s.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnref import _tfds
from bnref._download import STALE_PART_S, TIMEOUT_S, DownloadError  # re-exported: bnref.data's names
from bnref._download import fetch as _fetch
from bnref._download import made_dirs as _made_dirs
from bnref._download import remove_stale_parts as _remove_stale_parts

__all__ = [
    "CLASSES",
    "DEFAULT_MIRROR",
    "FILES",
    "SHA256",
    "SYSTEM_DIR",
    "DataNotFoundError",
    "DownloadError",
    "FashionMNIST",
    "cache_dir",
    "candidate_dirs",
    "decompressed_sha256",
    "download",
    "find_data_dir",
    "is_synthetic",
    "load_fashion_mnist",
    "load_or_synthetic",
    "main",
    "read_idx_images",
    "read_idx_labels",
    "verify_checksums",
    "write_fashion_mnist",
    "write_idx_images",
    "write_idx_labels",
]

# d2l's text labels, indexed by the label value.
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

# Keys are FashionMNIST's field names, so `getattr(data, key)` is that file's array.
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of the DECOMPRESSED content. The .gz bytes are not a stable identity: Debian
# re-compressed the files (dropping the stored file name), so their .gz checksums
# differ from the original release's while the content is identical.
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# The data directory of the official zalandoresearch/fashion-mnist repository, over HTTPS
# (the S3 website mirror of its README is plain HTTP only). Every file is also checked
# against SHA256 before it is kept, whatever the mirror.
DEFAULT_MIRROR = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"

# No Fashion-MNIST file decompresses to more than this (the largest, the training images, is
# 47,040,016 bytes). Downloads and reads stop past it: a corrupt or hostile gzip stream
# cannot make bnref inflate gigabytes (a "gzip bomb").
MAX_FILE_BYTES = 64 << 20

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist

ROWS = COLS = 28
_IMAGES_MAGIC = 2051  # 0x00000803: uint8 data, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: uint8 data, 1 dimension


class DataNotFoundError(FileNotFoundError):
    """No directory holds the four files, and they could not be downloaded."""


@dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays has no single truth value
class FashionMNIST:
    """The two splits as NumPy arrays.

    ``*_images``: uint8 ``(N, 28, 28)``; ``*_labels``: int64 ``(N,)`` in 0..9, indexing
    :data:`CLASSES`. ``source`` is the directory the files were read from, or "tfds".
    ``release``: True when the four files' content is the original release's (their
    SHA-256 checked as they were read), False when it is not (a fixture, a subset, another
    dataset in the same format), None when not checked (synthetic data, tfds).
    ``sha256``: one digest of the four files' decompressed content (what a run directory records,
    so that a resumed run can check it trains on the same data); None for synthetic data and tfds.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    release: bool | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            where = f"{self.source}: {split}"
            if images.dtype != np.uint8 or images.shape[1:] != (ROWS, COLS):
                raise ValueError(f"{where} images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
            if labels.dtype != np.int64 or labels.ndim != 1:
                raise ValueError(f"{where} labels must be int64 (N,), got {labels.dtype} {labels.shape}")
            if len(images) != len(labels):
                raise ValueError(f"{where} split has {len(images)} images but {len(labels)} labels")
            _check_labels(labels, f"{where} labels")


def synthetic(n_train: int = 512, n_test: int = 256, seed: int = 0) -> FashionMNIST:
    """A small, learnable stand-in with Fashion-MNIST's shapes and dtypes, for tests and for
    runs without the real files: class ``k`` is a bright 7x7 block at a class-specific
    place on noise, so a network learns it in a few steps."""
    splits = []
    for n, s in ((n_train, seed), (n_test, seed + 1)):
        rng = np.random.default_rng(s)
        labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
        images = rng.integers(0, 60, (n, ROWS, COLS)).astype(np.uint8)  # (n, 28, 28) noise
        for k in range(len(CLASSES)):
            r, c = divmod(k, 4)
            images[labels == k, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = 230
        splits += [images, labels]
    return FashionMNIST(*splits, source=f"synthetic(seed={seed})")


def is_synthetic(source: str) -> bool:
    """Whether ``source`` (a ``FashionMNIST.source``, or one recorded in a run's or experiment's
    JSON) names :func:`synthetic` data."""
    return str(source).startswith("synthetic(")


def load_or_synthetic(data_dir: str | os.PathLike | None = None, *, synthetic_data: bool = False,
                      n_train: int = 60000, n_test: int = 10000, seed: int = 0) -> FashionMNIST:
    """What a tool's ``--data-dir DIR`` / ``--synthetic`` asks for: :func:`synthetic` of the given
    sizes (at most Fashion-MNIST's 60000 / 10000) when ``synthetic_data`` (an explicit choice), else Fashion-MNIST as
    :func:`load_fashion_mnist` finds it, never downloading. Missing or corrupt files are an error
    (:class:`DataNotFoundError` / ``ValueError``), never a silent switch to synthetic data: a
    figure drawn on the stand-in looks like a result (BN at 100% test accuracy). ``.source``
    says which data it is."""
    if synthetic_data:
        if data_dir is not None:
            raise ValueError("--synthetic and --data-dir exclude each other: the synthetic stand-in reads no files")
        # Fashion-MNIST's sizes at most: the stand-in stands in for it (and a size derived from a
        # huge --batch-size would allocate gigabytes before any check could refuse the batch).
        return synthetic(min(n_train, 60000), min(n_test, 10000), seed)
    return load_fashion_mnist(data_dir, download=False)


# --- IDX reading and writing ----------------------------------------------------------


def _open_maybe_gzip(path: Path):
    """The file's decompressed stream; gzip is recognised by its magic bytes, not the name."""
    f = open(path, "rb")
    if f.read(2) == b"\x1f\x8b":  # IDX files start with 0x00 0x00 instead
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    f.seek(0)
    return f, f


def _read_capped(stream, size: int, name: str) -> bytes:
    try:
        return stream.read(size)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # EOFError: stream cut short
        raise ValueError(f"{name}: corrupt or truncated gzip stream ({e})") from e


def _iter_decompressed(path: Path, name: str, limit: int = None):
    """The decompressed content in 1 MiB chunks; ``ValueError`` past ``limit`` bytes (default
    :data:`MAX_FILE_BYTES`) or on a corrupt stream. Never holds the whole content."""
    limit = MAX_FILE_BYTES if limit is None else limit
    stream, raw = _open_maybe_gzip(path)
    total = 0
    with raw, stream:
        while chunk := _read_capped(stream, 1 << 20, name):
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{name}: decompresses to more than {limit} bytes; no Fashion-MNIST file is that large")
            yield chunk


def _parse(path: Path, magic: int, ndim: int, what: str, item_bytes) -> tuple[tuple[int, ...], bytes, str]:
    """Read an IDX file: check the header, read exactly the data it promises (never more than
    :data:`MAX_FILE_BYTES`); returns (dimension sizes, data bytes, SHA-256 of the content)."""
    start = 4 + 4 * ndim
    stream, raw = _open_maybe_gzip(path)
    with raw, stream:
        header = _read_capped(stream, start, str(path))
        if len(header) < start:
            raise ValueError(f"{path}: truncated header: {len(header)} bytes, an IDX {what} file has {start}")
        found = int.from_bytes(header[:4], "big")
        if found != magic:
            raise ValueError(f"{path}: bad magic number {found} (0x{found:08x}), expected {magic} for IDX {what}")
        dims = struct.unpack(f">{ndim}I", header[4:start])
        expected, description = item_bytes(dims)
        if start + expected > MAX_FILE_BYTES:
            raise ValueError(f"{path}: header promises {description} = {expected} bytes, more than any "
                             f"Fashion-MNIST file ({MAX_FILE_BYTES} bytes)")  # fmt: skip
        body = _read_capped(stream, expected, str(path))
        if len(body) < expected:
            raise ValueError(f"{path}: truncated: header promises {description} = {expected} bytes, file has {len(body)}")
        extra = len(_read_capped(stream, 1 << 20, str(path)))
        if extra:
            more = "" if extra < 1 << 20 else "at least "
            raise ValueError(f"{path}: {more}{extra} trailing bytes after {description} = {expected} bytes")
    return dims, body, hashlib.sha256(header + body).hexdigest()


def _check_labels(labels: np.ndarray, name: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= len(CLASSES)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: label {labels[i]} at index {i} is outside 0..9 ({bad.size} such labels)")


def _read_images(path: Path) -> tuple[np.ndarray, str]:
    def size(dims):
        n, rows, cols = dims
        if (rows, cols) != (ROWS, COLS):
            raise ValueError(f"{path}: images are {rows}x{cols}, Fashion-MNIST's are {ROWS}x{COLS}")
        return n * ROWS * COLS, f"{n} images of {ROWS}x{COLS}"

    (n, _, _), body, digest = _parse(path, _IMAGES_MAGIC, 3, "images", size)
    # copy(): frombuffer over bytes is read-only, and torch.from_numpy warns on that.
    return np.frombuffer(body, np.uint8).reshape(n, ROWS, COLS).copy(), digest


def _read_labels(path: Path) -> tuple[np.ndarray, str]:
    (n,), body, digest = _parse(path, _LABELS_MAGIC, 1, "labels", lambda dims: (dims[0], f"{dims[0]} labels"))
    labels = np.frombuffer(body, np.uint8).astype(np.int64)  # (N,), a copy
    _check_labels(labels, str(path))
    return labels, digest


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX image file (.gz or not). Returns uint8 ``(N, 28, 28)``, writable."""
    return _read_images(Path(path))[0]


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX label file (.gz or not). Returns int64 ``(N,)`` with values in 0..9."""
    return _read_labels(Path(path))[0]


def _write_gz(path: str | os.PathLike, content: bytes) -> None:
    # mtime=0: equal content gives equal bytes, so fixtures are reproducible.
    Path(path).write_bytes(gzip.compress(content, mtime=0))


def write_idx_images(path: str | os.PathLike, images: np.ndarray) -> None:
    """Write uint8 ``(N, 28, 28)`` images as a gzip-compressed IDX file."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (ROWS, COLS):
        raise ValueError(f"{path}: images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    header = struct.pack(">4I", _IMAGES_MAGIC, len(images), ROWS, COLS)
    _write_gz(path, header + np.ascontiguousarray(images).tobytes())  # C order = IDX order


def write_idx_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write integer labels ``(N,)`` in 0..9 as a gzip-compressed IDX file."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers of shape (N,), got {labels.dtype} {labels.shape}")
    _check_labels(labels, str(path))
    _write_gz(path, struct.pack(">2I", _LABELS_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: str | os.PathLike, data: FashionMNIST) -> Path:
    """Write ``data`` as the four standard files into ``directory`` (made if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        write = write_idx_images if key.endswith("images") else write_idx_labels
        write(directory / name, getattr(data, key))
    return directory


def decompressed_sha256(path: str | os.PathLike, name: str | None = None) -> str:
    """Hex SHA-256 of the file's decompressed content (what :data:`SHA256` records), streamed,
    at most :data:`MAX_FILE_BYTES` of it; errors name the file as ``name`` (default: its path)."""
    h = hashlib.sha256()
    for chunk in _iter_decompressed(Path(path), name or str(path)):
        h.update(chunk)
    return h.hexdigest()


def verify_checksums(directory: str | os.PathLike, checksums: Mapping[str, str] = SHA256) -> None:
    """Raise ``ValueError`` naming every file in ``directory`` whose content differs."""
    directory = Path(directory)
    problems = []
    for name in FILES.values():
        path = _find_file(directory, name)
        if path is None:
            problems.append(f"{directory / name}: missing")
        elif (digest := decompressed_sha256(path)) != checksums[name]:
            problems.append(f"{path}: SHA-256 {digest}, expected {checksums[name]}")
    if problems:
        raise ValueError("; ".join(problems))


# --- Finding the files -------------------------------------------------------------------


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bnref/fashion-mnist``, default ``~/.cache/bnref/fashion-mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnref" / "fashion-mnist"


_ENV = "$BNREF_DATA_DIR"
_DATA_DIR = "data_dir argument"
_CACHE = "per-user cache"
_SYSTEM = "Debian package dataset-fashion-mnist"


def _candidates(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(directory, why it is searched), in search order.

    A directory the user named (``data_dir``, else ``$BNREF_DATA_DIR``) is the only one: a
    typo there must be an error, never a silent fall-back to other data. Otherwise the
    cache, then the system directory.
    """
    if data_dir is not None:
        return [(_expand(data_dir, _DATA_DIR), _DATA_DIR)]
    if env := os.environ.get("BNREF_DATA_DIR"):
        return [(_expand(env, _ENV), _ENV)]
    return [(cache_dir(), _CACHE), (SYSTEM_DIR, _SYSTEM)]


def _expand(path: str | os.PathLike, why: str) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; ``ValueError`` (not ``RuntimeError``) naming it
    when the user does not exist."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:  # "Could not determine home directory."
        raise ValueError(f"{os.fspath(path)!r} ({why}): cannot expand its '~': {e}") from None


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched, in order: ``data_dir`` alone if given, else ``$BNREF_DATA_DIR``
    alone if set, else the cache and the system directory."""
    return [path for path, _ in _candidates(data_dir)]


def _find_file(directory: Path, name: str) -> Path | None:
    """``name`` in ``directory``, or its uncompressed twin (``name`` without ``.gz``); None when
    neither exists. ``ValueError`` when one exists but is not a regular file (a directory, a FIFO,
    a socket, a dangling or looping symlink): that is not "missing", and a FIFO would block the
    reader forever."""
    for path in (directory / name, directory / name.removesuffix(".gz")):
        try:
            if path.is_file():
                return path
            present = os.path.lexists(path)
        except OSError as e:  # e.g. ELOOP on some platforms, EACCES on the directory
            raise ValueError(f"{path}: cannot be examined ({e.strerror or e})") from None
        if present:
            raise ValueError(f"{path} is {_what_is(path)}, not a data file: remove it or put the file there")
    return None


def _what_is(path: Path) -> str:
    import stat

    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as e:
        return f"a symlink that cannot be followed ({e.strerror or e})"  # dangling, or a loop (ELOOP)
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _missing(directory: Path) -> list[str]:
    return [name for name in FILES.values() if _find_file(directory, name) is None]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of :func:`candidate_dirs` that holds all four files, else None."""
    return next((path for path in candidate_dirs(data_dir) if not _missing(path)), None)


# --- Downloading (how one file arrives, atomically and verified: bnref._download) -----------


def _digest_or_none(path: Path) -> str | None:
    try:
        return decompressed_sha256(path)
    except (OSError, ValueError):  # unreadable, not even valid gzip, or too large
        return None


def download(
    dest_dir: str | os.PathLike,
    base_url: str = DEFAULT_MIRROR,
    progress: bool = True,
    checksums: Mapping[str, str] = SHA256,
) -> Path:
    """Download the four files from ``base_url`` into ``dest_dir`` and return it.

    Each file is checked against ``checksums[name]`` (SHA-256 of its decompressed
    content) before it is moved into place, so ``dest_dir`` never holds a partial or
    wrong file, even after an error or Ctrl-C. Files already present with the right
    checksum are not fetched again. Raises :class:`DownloadError` (an ``OSError``) when
    a transfer fails and ``ValueError`` on a checksum mismatch.
    """
    dest = _expand(dest_dir, "download directory")
    with _made_dirs(dest):  # a failed download leaves no empty directory tree behind
        _remove_stale_parts(dest, FILES.values())
        for name in FILES.values():
            target = dest / name
            if target.is_file() and _digest_or_none(target) == checksums[name]:
                continue  # a corrupt or different file is fetched again, atomically replaced
            # this module's one size cap and digest, read at call time, bound the transfer too
            _fetch(f"{base_url.rstrip('/')}/{name}", target, checksums[name], progress,
                   digest=decompressed_sha256, max_bytes=MAX_FILE_BYTES)  # fmt: skip
    return dest


_download = download  # load_fashion_mnist's `download` flag shadows the function


# --- Loading -------------------------------------------------------------------------------


def _read_dir(directory: Path, checksums: Mapping[str, str]) -> FashionMNIST:
    """Read the four files, checking each one's SHA-256 as it is read (no second pass)."""
    arrays, release, digests = {}, True, []
    for split in ("train", "test"):
        images_path = _find_file(directory, FILES[f"{split}_images"])
        labels_path = _find_file(directory, FILES[f"{split}_labels"])
        (images, d_images), (labels, d_labels) = _readable(_read_images, images_path), _readable(_read_labels, labels_path)
        release &= d_images == checksums[FILES[f"{split}_images"]] and d_labels == checksums[FILES[f"{split}_labels"]]
        digests += [d_images, d_labels]
        if len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} split mismatch: {images_path.name} holds {len(images)} "
                f"images but {labels_path.name} holds {len(labels)} labels"
            )
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    combined = hashlib.sha256(" ".join(digests).encode()).hexdigest()
    return FashionMNIST(**arrays, source=str(directory), release=release, sha256=combined)


def _readable(read, path: Path):
    """``read(path)``, an ``OSError`` (permissions, I/O) turned into ``ValueError`` naming the file."""
    try:
        return read(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _bad_files(directory: Path, checksums: Mapping[str, str]) -> list[Path]:
    """The files in ``directory`` whose content is not the release's (or that cannot be read)."""
    bad = []
    for name in FILES.values():
        path = _find_file(directory, name)
        if path is not None and _digest_or_none(path) != checksums[name]:
            bad.append(path)
    return bad


def _read_verified(directory: Path, why: str, download: bool) -> FashionMNIST:
    """Read a directory bnref searched on its own (the cache, the system directory): its files
    must be the release. A corrupt or truncated cache file is downloaded again (atomically
    replaced) when downloading is allowed; otherwise, and for the system directory, the error
    names the files to delete or reinstall."""
    try:
        loaded = _read_dir(directory, SHA256)
    except ValueError:
        loaded = None
    if loaded is not None and loaded.release:
        return loaded
    bad = _bad_files(directory, SHA256)
    if why == _CACHE and download:
        _download_or_raise(directory, [(directory, why)])  # replaces exactly the bad files
        return _read_dir(directory, SHA256)
    remedy = ("delete them (they are downloaded again)" if why == _CACHE
              else "reinstall the package: apt-get install --reinstall dataset-fashion-mnist")  # fmt: skip
    raise ValueError(
        f"{directory} ({why}): {len(bad)} file(s) are corrupt or not the Fashion-MNIST release "
        f"(SHA-256 differs): {', '.join(str(p) for p in bad)}; {remedy}"
    )


def _not_found(looked: list[tuple[Path, str]], reason: str, dest: Path) -> DataNotFoundError:
    lines = ["Fashion-MNIST files not found. Looked in:"]
    for path, why in looked:
        state = "does not exist" if not path.is_dir() else f"missing {', '.join(_missing(path))}"
        lines.append(f"  {path}  ({why}): {state}")
    lines += [
        reason,
        "Provide the four files in one of these ways:",
        "  - set BNREF_DATA_DIR (or pass data_dir / --data-dir) to a directory holding them;",
        "  - apt-get install dataset-fashion-mnist  (puts them in /usr/share/datasets/fashion-mnist);",
        f"  - download {', '.join(FILES.values())}",
        f"    from {DEFAULT_MIRROR} into {dest}",
    ]
    return DataNotFoundError("\n".join(lines))


_NO_DOWNLOAD = "Downloading was turned off (download=False, --no-download)."


def _download_or_raise(dest: Path, looked: list[tuple[Path, str]]) -> None:
    # Module globals are read here, at call time, so tests can point them at fixtures.
    try:
        _download(dest, DEFAULT_MIRROR, checksums=SHA256)
    except (OSError, ValueError) as e:
        raise _not_found(looked, f"Downloading into {dest} failed: {e}", dest) from e


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, *, download: bool = True, source: str = "idx"
) -> FashionMNIST:
    """Load both splits. Images uint8 ``(N, 28, 28)``, labels int64 ``(N,)``.

    ``source="idx"`` (default): with ``data_dir`` given, ONLY that directory is used
    (likewise ``$BNREF_DATA_DIR`` when set, which must exist); if it lacks files they are
    downloaded into it when ``download`` is true, else :class:`DataNotFoundError` lists
    what is missing. A directory the user named never falls back to other places, which
    could silently hand over different data; its content may differ from the release (a
    subset, fixtures), and the result's ``release`` says whether it does. Otherwise the
    cache, then the system directory, is used, and there the files must be the release:
    a corrupt or truncated cache file is downloaded again (or, with downloading off, the
    error names it); if neither holds the files, they are downloaded into the cache (when
    ``download``). Failure raises :class:`DataNotFoundError` (a ``FileNotFoundError``)
    listing every place looked at and how to provide the files, or ``ValueError`` naming
    a corrupt file. Every file's SHA-256 is computed while it is read (``release``).

    ``source="tfds"``: tensorflow-datasets' ``fashion_mnist`` through ``tfds.data_source``;
    ``data_dir`` is then TFDS's own data directory and ``download`` is passed to it.
    Reading an already prepared copy needs no TensorFlow; preparing one (the first
    download) does, because TFDS encodes the images to PNG with ``tf.image``.
    """
    if source == "tfds":
        return FashionMNIST(**_tfds.load_arrays(data_dir, download), source="tfds")
    if source != "idx":
        raise ValueError(f"source must be 'idx' or 'tfds', got {source!r}")
    looked = _candidates(data_dir)
    directory, why = looked[0]
    if why in (_DATA_DIR, _ENV):
        # The user's own directory: only it. The content may legitimately differ from the
        # release (a subset, a fixture); `release` on the result says whether it is the release.
        # A directory the user named that does not exist is a typo, not a place to download
        # into (that would make /typo and fetch 30 MB there): one line, nothing created.
        if not directory.is_dir():
            state = "is not a directory" if os.path.lexists(directory) else "does not exist"
            raise DataNotFoundError(f"Fashion-MNIST files not found: {directory} ({why}) {state}; a directory you "
                                    "name is the only one looked at "
                                    "(check for a typo, or create it to download into it)")  # fmt: skip
        if _missing(directory):
            if not download:
                raise _not_found(looked, _NO_DOWNLOAD, directory)
            _download_or_raise(directory, looked)
        return _read_dir(directory, SHA256)
    for directory, why in looked:
        if not _missing(directory):
            return _read_verified(directory, why, download)
    directory = cache_dir()
    if not download:
        raise _not_found(looked, _NO_DOWNLOAD, directory)
    _download_or_raise(directory, looked)
    return _read_dir(directory, SHA256)


def describe_source(data: FashionMNIST) -> str:
    """Where ``data`` came from and whether it is the original release, in one line, e.g.
    ``/usr/share/datasets/fashion-mnist (the Fashion-MNIST release: SHA-256 verified)``."""
    verdict = {
        True: "the Fashion-MNIST release: SHA-256 verified",
        False: "NOT the Fashion-MNIST release: its SHA-256 differs (used as given)",
        None: "not checked against the release",
    }[data.release]
    if is_synthetic(data.source):
        verdict = "NOT Fashion-MNIST: bnref.data.synthetic, the stand-in asked for with --synthetic"
    return f"{data.source} ({verdict}; {len(data.train_labels)} train / {len(data.test_labels)} test)"


# --- Command line -------------------------------------------------------------------------


def describe(data: FashionMNIST) -> str:
    """Human-readable summary: where from, checksums, split sizes, per-class counts."""
    lines = [f"Fashion-MNIST from {data.source}"]
    if data.source != "tfds":
        try:
            verify_checksums(data.source)
            lines.append("checksums: match the original release")
        except ValueError as e:
            lines.append(f"checksums: differ from the original release ({e})")
    for split in ("train", "test"):
        images = getattr(data, f"{split}_images")
        lines.append(f"{split}: {len(images)} images {images.shape[1]}x{images.shape[2]} {images.dtype}")
    train = np.bincount(data.train_labels, minlength=len(CLASSES))
    test = np.bincount(data.test_labels, minlength=len(CLASSES))
    lines.append(f"{'label':>5}  {'class':<10} {'train':>6} {'test':>6}")
    lines += [f"{i:>5}  {name:<10} {train[i]:>6} {test[i]:>6}" for i, name in enumerate(CLASSES)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bnref.data [--data-dir D] [--no-download] [--source idx|tfds]``."""
    parser = argparse.ArgumentParser(prog="python -m bnref.data", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="use only this directory")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    parser.add_argument("--source", choices=("idx", "tfds"), default="idx")
    args = parser.parse_args(argv)
    try:
        data = load_fashion_mnist(args.data_dir, download=not args.no_download, source=args.source)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
