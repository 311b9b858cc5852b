"""Tests for bnref.data: IDX reading/writing, search order, download, loading, CLI.

Everything runs on small fixtures written here and served from a loopback HTTP server;
the real network is never touched. One test reads the real files when present.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import time
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bnref import data

# --- Fixtures ------------------------------------------------------------------------------


def fake_dataset(n_train: int = 12, n_test: int = 5, seed: int = 0) -> data.FashionMNIST:
    """Random images (N, 28, 28) uint8 and labels (N,) int64 covering every class."""
    rng = np.random.default_rng(seed)
    return data.FashionMNIST(
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_labels=np.arange(n_train, dtype=np.int64) % 10,
        test_images=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 10, n_test, dtype=np.int64),
        source="fixture",
    )


def checksums_of(directory: Path) -> dict[str, str]:
    return {name: data.decompressed_sha256(directory / name) for name in data.FILES.values()}


def assert_same(loaded: data.FashionMNIST, expected: data.FashionMNIST) -> None:
    for key in data.FILES:
        got, want = getattr(loaded, key), getattr(expected, key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


def write_gz(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content, mtime=0))
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Point env, cache and system dir into tmp_path: no test sees the real ones."""
    monkeypatch.delenv("BNREF_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")


@pytest.fixture
def fixture_data() -> data.FashionMNIST:
    return fake_dataset()


@pytest.fixture
def fixture_dir(tmp_path, fixture_data) -> Path:
    return data.write_fashion_mnist(tmp_path / "fixture", fixture_data)


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror directory; names in server.truncate are cut short mid-body."""

    def do_GET(self):
        self.server.requests.append(self.path)
        name = self.path.lstrip("/")
        if name in self.server.truncate:
            body = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))  # promises the full body
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep test output clean
        pass


class Mirror:
    def __init__(self, root: Path):
        self.root = root
        handler = functools.partial(_MirrorHandler, directory=str(root))
        self.server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        self.server.requests, self.server.truncate = [], set()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    @property
    def truncate(self) -> set[str]:
        return self.server.truncate


@pytest.fixture
def mirror(tmp_path, fixture_data):
    """A loopback HTTP server holding the fixture's four .gz files."""
    m = Mirror(data.write_fashion_mnist(tmp_path / "mirror", fixture_data))
    m.thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()
    m.thread.join()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- IDX round trip and validation -----------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7])
def test_idx_round_trip(tmp_path, n):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    data.write_idx_images(tmp_path / "i.gz", images)
    data.write_idx_labels(tmp_path / "l.gz", labels)
    got_images, got_labels = data.read_idx_images(tmp_path / "i.gz"), data.read_idx_labels(tmp_path / "l.gz")
    assert got_images.dtype == np.uint8 and got_images.shape == (n, 28, 28)
    assert got_labels.dtype == np.int64 and got_labels.shape == (n,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable and got_labels.flags.writeable  # torch.from_numpy warns otherwise


def test_idx_layout_is_row_major_big_endian(tmp_path):
    """A hand-built file pins the format: header fields big-endian, pixels row by row."""
    pixels = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8)  # (2*28*28,)
    write_gz(tmp_path / "i.gz", struct.pack(">4I", 2051, 2, 28, 28) + pixels.tobytes())
    images = data.read_idx_images(tmp_path / "i.gz")
    assert images[1, 0, 1] == pixels[28 * 28 + 1] and images[0, 2, 0] == pixels[2 * 28]
    data.write_idx_images(tmp_path / "again.gz", images)
    original, again = (gzip.decompress((tmp_path / name).read_bytes()) for name in ("i.gz", "again.gz"))
    assert again == original


def test_uncompressed_idx_is_read(tmp_path):
    write_gz(tmp_path / "l.gz", struct.pack(">2I", 2049, 3) + bytes([0, 9, 4]))
    (tmp_path / "l").write_bytes(gzip.decompress((tmp_path / "l.gz").read_bytes()))
    np.testing.assert_array_equal(data.read_idx_labels(tmp_path / "l"), [0, 9, 4])


IMAGE_HEADER = struct.pack(">4I", 2051, 2, 28, 28)
BAD_IDX = {
    # case: (reader, decompressed content, expected message fragment)
    "labels-read-as-images": (data.read_idx_images, struct.pack(">4I", 2049, 2, 28, 28) + bytes(1568), "bad magic number 2049"),
    "images-read-as-labels": (data.read_idx_labels, IMAGE_HEADER + bytes(1568), "bad magic number 2051"),
    "wrong-image-size": (data.read_idx_images, struct.pack(">4I", 2051, 2, 32, 28) + bytes(2 * 32 * 28), "32x28"),
    "truncated-pixels": (data.read_idx_images, IMAGE_HEADER + bytes(1567), "truncated"),
    "trailing-pixels": (data.read_idx_images, IMAGE_HEADER + bytes(1569), "1 trailing bytes"),
    "truncated-header": (data.read_idx_images, struct.pack(">2I", 2051, 2), "truncated header"),
    "empty-file": (data.read_idx_labels, b"", "truncated header"),
    "truncated-labels": (data.read_idx_labels, struct.pack(">2I", 2049, 5) + bytes(4), "truncated"),
    "label-out-of-range": (data.read_idx_labels, struct.pack(">2I", 2049, 3) + bytes([1, 10, 2]), "label 10 at index 1"),
}


@pytest.mark.parametrize("case", BAD_IDX)
def test_bad_idx_raises_naming_file_and_problem(tmp_path, case):
    reader, content, problem = BAD_IDX[case]
    path = write_gz(tmp_path / f"{case}.gz", content)
    with pytest.raises(ValueError, match=problem) as info:
        reader(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("writer", "reader", "array"),
    [
        (data.write_idx_images, data.read_idx_images, np.zeros((4, 28, 28), np.uint8)),
        (data.write_idx_labels, data.read_idx_labels, np.zeros(4000, np.int64)),
    ],
    ids=["images", "labels"],
)
def test_truncated_gzip_raises(tmp_path, writer, reader, array):
    good = tmp_path / "good.gz"
    writer(good, array)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        reader(cut)


@pytest.mark.parametrize(
    ("writer", "array", "problem"),
    [
        (data.write_idx_images, np.zeros((2, 28, 28), np.float32), "uint8"),
        (data.write_idx_images, np.zeros((2, 28, 27), np.uint8), r"\(2, 28, 27\)"),
        (data.write_idx_images, np.zeros((2, 28, 28, 1), np.uint8), "uint8 \\(N, 28, 28\\)"),
        (data.write_idx_labels, np.array([0, 10]), "label 10 at index 1"),
        (data.write_idx_labels, np.array([-1, 3]), "label -1 at index 0"),
        (data.write_idx_labels, np.array([0.0, 1.0]), "integers"),
    ],
    ids=["float-images", "27-columns", "channel-axis", "label-10", "label-negative", "float-labels"],
)
def test_writers_reject_bad_arrays(tmp_path, writer, array, problem):
    with pytest.raises(ValueError, match=problem):
        writer(tmp_path / "x.gz", array)
    assert not (tmp_path / "x.gz").exists()


def test_count_mismatch_between_images_and_labels(fixture_dir):
    data.write_idx_labels(fixture_dir / data.FILES["train_labels"], np.zeros(11, np.int64))
    with pytest.raises(ValueError, match="train split mismatch") as info:
        data.load_fashion_mnist(fixture_dir, download=False)
    assert "holds 12 images" in str(info.value) and "holds 11 labels" in str(info.value)
    assert data.FILES["train_labels"] in str(info.value)


def test_dataclass_validates_direct_construction(fixture_data):
    with pytest.raises(ValueError, match="test split has 5 images but 4 labels"):
        data.FashionMNIST(
            fixture_data.train_images, fixture_data.train_labels,
            fixture_data.test_images, fixture_data.test_labels[:4], source="x",
        )  # fmt: skip
    with pytest.raises(ValueError, match="train labels must be int64"):
        data.FashionMNIST(
            fixture_data.train_images, fixture_data.train_labels.astype(np.uint8),
            fixture_data.test_images, fixture_data.test_labels, source="x",
        )  # fmt: skip


# --- Search order --------------------------------------------------------------------------


def test_candidate_dirs_a_named_directory_is_the_only_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BNREF_DATA_DIR", str(tmp_path / "env"))
    assert data.candidate_dirs(tmp_path / "explicit") == [tmp_path / "explicit"]
    assert data.candidate_dirs() == [tmp_path / "env"]
    monkeypatch.delenv("BNREF_DATA_DIR")
    assert data.candidate_dirs() == [tmp_path / "xdg-cache" / "bnref" / "fashion-mnist", tmp_path / "system"]


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "bnref" / "fashion-mnist"


@pytest.mark.parametrize("winner", ["cache", "system"])
def test_find_data_dir_takes_first_complete_candidate(tmp_path, fixture_data, winner):
    """Every candidate from `winner` on holds the data; the ones before hold 3 of 4 files."""
    dirs = dict(zip(["cache", "system"], data.candidate_dirs()))
    order = list(dirs)
    for name, path in dirs.items():
        data.write_fashion_mnist(path, fixture_data)
        if order.index(name) < order.index(winner):
            (path / data.FILES["test_labels"]).unlink()  # incomplete: must be skipped
    assert data.find_data_dir() == dirs[winner]


def test_env_dir_without_the_data_is_an_error_not_a_fallback(tmp_path, monkeypatch, fixture_data):
    """On main at 7b1ede4, BNREF_DATA_DIR=/typo silently fell back to the cache's data."""
    data.write_fashion_mnist(data.cache_dir(), fixture_data)
    monkeypatch.setattr(data, "SHA256", checksums_of(data.cache_dir()))
    monkeypatch.setenv("BNREF_DATA_DIR", str(tmp_path / "typo"))
    assert data.find_data_dir() is None
    with pytest.raises(data.DataNotFoundError, match="does not exist") as info:
        data.load_fashion_mnist()
    assert str(tmp_path / "typo") in str(info.value) and str(data.cache_dir()) not in str(info.value)
    (tmp_path / "typo").mkdir()  # exists but empty: missing files, downloading off
    with pytest.raises(data.DataNotFoundError, match="missing"):
        data.load_fashion_mnist(download=False)


def test_find_data_dir_none_when_nothing_found(tmp_path):
    assert data.find_data_dir(tmp_path / "nowhere") is None


def test_uncompressed_files_count_as_present(fixture_dir, fixture_data):
    gz = fixture_dir / data.FILES["train_images"]
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))  # strips ".gz"
    gz.unlink()
    assert data.find_data_dir(fixture_dir) == fixture_dir
    assert_same(data.load_fashion_mnist(fixture_dir, download=False), fixture_data)


# --- Loading -------------------------------------------------------------------------------


def test_load_explicit_dir(fixture_dir, fixture_data):
    loaded = data.load_fashion_mnist(fixture_dir, download=False)
    assert_same(loaded, fixture_data)
    assert loaded.source == str(fixture_dir)


@pytest.mark.parametrize("place", ["env", "cache", "system"])
def test_load_searches_env_cache_system(tmp_path, monkeypatch, fixture_data, place):
    if place == "env":
        monkeypatch.setenv("BNREF_DATA_DIR", str(tmp_path / "env"))
    path = {"env": tmp_path / "env", "cache": data.cache_dir(), "system": data.SYSTEM_DIR}[place]
    data.write_fashion_mnist(path, fixture_data)
    monkeypatch.setattr(data, "SHA256", checksums_of(path))  # the fixture plays the release here
    loaded = data.load_fashion_mnist(download=False)
    assert loaded.source == str(path) and loaded.release is True
    assert_same(loaded, fixture_data)


def test_load_reports_whether_the_content_is_the_release(fixture_dir, monkeypatch):
    assert data.load_fashion_mnist(fixture_dir, download=False).release is False  # a fixture, used as given
    monkeypatch.setattr(data, "SHA256", checksums_of(fixture_dir))
    loaded = data.load_fashion_mnist(fixture_dir, download=False)
    assert loaded.release is True and "SHA-256 verified" in data.describe_source(loaded)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_cache_file_is_downloaded_again(tmp_path, mirror, monkeypatch, fixture_data, damage):
    """On main at 7b1ede4 a corrupt-but-parseable cache file trained silently and a truncated
    one was never repaired."""
    monkeypatch.setattr(data, "DEFAULT_MIRROR", mirror.url)
    monkeypatch.setattr(data, "SHA256", checksums_of(mirror.root))
    cache = data.write_fashion_mnist(data.cache_dir(), fixture_data)
    labels = cache / data.FILES["train_labels"]
    if damage == "corrupt":  # still a valid IDX file: other labels
        data.write_idx_labels(labels, (fixture_data.train_labels + 1) % 10)
    else:
        labels.write_bytes(labels.read_bytes()[:-5])
    loaded = data.load_fashion_mnist()
    assert loaded.release is True and mirror.requests == ["/" + data.FILES["train_labels"]]
    assert_same(loaded, fixture_data)


def test_corrupt_cache_file_without_download_names_the_file(monkeypatch, fixture_data):
    cache = data.write_fashion_mnist(data.cache_dir(), fixture_data)
    monkeypatch.setattr(data, "SHA256", checksums_of(cache))
    data.write_idx_labels(cache / data.FILES["test_labels"], (fixture_data.test_labels + 3) % 10)
    with pytest.raises(ValueError, match="not the Fashion-MNIST release") as info:
        data.load_fashion_mnist(download=False)
    assert str(cache / data.FILES["test_labels"]) in str(info.value) and "delete" in str(info.value)


def test_explicit_dir_never_falls_back(tmp_path, monkeypatch, fixture_data):
    """Data in $BNREF_DATA_DIR must not stand in for a mistyped --data-dir."""
    monkeypatch.setenv("BNREF_DATA_DIR", str(data.write_fashion_mnist(tmp_path / "env", fixture_data)))
    partial = data.write_fashion_mnist(tmp_path / "explicit", fixture_data)
    (partial / data.FILES["test_images"]).unlink()
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist(partial, download=False)
    message = str(info.value)
    assert f"{partial}  (data_dir argument): missing {data.FILES['test_images']}" in message
    assert str(tmp_path / "env") not in message  # only the explicit dir was considered
    assert "turned off" in message


def test_not_found_message_lists_every_place_and_remedy(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:  # DataNotFoundError is one
        data.load_fashion_mnist(download=False)
    message = str(info.value)
    for path in data.candidate_dirs():
        assert f"{path}  (" in message
    remedies = ("BNREF_DATA_DIR", "apt-get install dataset-fashion-mnist", data.DEFAULT_MIRROR, *data.FILES.values())
    for remedy in remedies:
        assert remedy in message
    assert not (tmp_path / "xdg-cache").exists()  # nothing was created


def test_unknown_source_rejected():
    with pytest.raises(ValueError, match="'idx' or 'tfds'"):
        data.load_fashion_mnist(source="torchvision")


# --- Download (loopback only) ---------------------------------------------------------------


def test_download_verifies_and_reports_progress(tmp_path, mirror, capsys, fixture_data):
    dest = data.download(tmp_path / "dest", mirror.url, checksums=checksums_of(mirror.root))
    assert dest == tmp_path / "dest"
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.FILES.values())  # no temp files left
    assert_same(data.load_fashion_mnist(dest, download=False), fixture_data)
    err = capsys.readouterr().err
    for name in data.FILES.values():
        assert name in err  # one tqdm bar per file
    assert "100%" in err


def test_download_quiet_and_skips_verified_files(tmp_path, mirror, capsys):
    checksums = checksums_of(mirror.root)
    data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums)
    assert capsys.readouterr().err == ""
    assert len(mirror.requests) == 4
    data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums)
    assert len(mirror.requests) == 4  # all four already present and verified


def test_download_replaces_corrupt_existing_file(tmp_path, mirror, fixture_data):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / data.FILES["train_images"]).write_bytes(b"\x1f\x8b not really gzip")
    data.download(dest, mirror.url, progress=False, checksums=checksums_of(mirror.root))
    assert_same(data.load_fashion_mnist(dest, download=False), fixture_data)


def test_checksum_mismatch_keeps_no_file(tmp_path, mirror):
    bad = data.FILES["test_labels"]  # the last one fetched
    checksums = checksums_of(mirror.root) | {bad: "0" * 64}
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums)
    assert bad in str(info.value) and "discarded" in str(info.value)
    # The three verified files stay; nothing of the bad one, no temp file.
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(set(data.FILES.values()) - {bad})


def test_http_404_keeps_no_file(tmp_path, mirror):
    name = data.FILES["train_images"]
    checksums = checksums_of(mirror.root)
    (mirror.root / name).unlink()
    with pytest.raises(data.DownloadError, match=f"{name}: HTTP 404"):
        data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums)
    assert not (tmp_path / "dest").exists()  # no file, and not the directory it made either


def test_truncated_transfer_keeps_no_partial_file(tmp_path, mirror):
    name = data.FILES["train_images"]
    mirror.truncate.add(name)
    with pytest.raises(data.DownloadError, match="transfer incomplete"):
        data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums_of(mirror.root))
    assert not (tmp_path / "dest").exists()


def test_interrupted_transfer_keeps_no_partial_file(tmp_path, mirror, monkeypatch):
    """Ctrl-C after some bytes were written: the temp file is removed, nothing renamed."""
    import tqdm

    def interrupt(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums_of(mirror.root))
    assert not (tmp_path / "dest").exists()


def test_default_mirror_is_https():
    assert data.DEFAULT_MIRROR.startswith("https://")


def test_download_refuses_a_gzip_bomb_without_inflating_it(tmp_path, mirror, monkeypatch):
    """On main at 7b1ede4 the download decompressed the whole payload in memory (a 1 MiB gzip
    bomb took RSS from 311 to 2274 MiB) before the checksum."""
    import tracemalloc

    monkeypatch.setattr(data, "MAX_FILE_BYTES", 8 << 20)
    checksums = checksums_of(mirror.root)
    name = data.FILES["train_labels"]
    (mirror.root / name).write_bytes(gzip.compress(bytes(64 << 20), compresslevel=9))  # 64 MiB of zeros in ~64 KiB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="decompresses to more than"):
            data.download(tmp_path / "dest", mirror.url, progress=False, checksums=checksums)
        peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak_mib < 16, f"peak allocation {peak_mib:.0f} MiB"
    assert not (tmp_path / "dest" / name).exists()


def test_reading_a_gzip_bomb_stops_at_the_header_size(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">2I", 2049, 3) + bytes(3) + bytes(32 << 20)))
    with pytest.raises(ValueError, match="at least 1048576 trailing bytes"):
        data.read_idx_labels(path)


def test_load_downloads_into_cache(tmp_path, mirror, monkeypatch, fixture_data):
    monkeypatch.setattr(data, "DEFAULT_MIRROR", mirror.url)
    monkeypatch.setattr(data, "SHA256", checksums_of(mirror.root))
    loaded = data.load_fashion_mnist()
    assert loaded.source == str(data.cache_dir())
    assert_same(loaded, fixture_data)


def test_load_downloads_into_explicit_dir(tmp_path, mirror, monkeypatch, fixture_data):
    monkeypatch.setattr(data, "DEFAULT_MIRROR", mirror.url)
    monkeypatch.setattr(data, "SHA256", checksums_of(mirror.root))
    (tmp_path / "mine").mkdir()  # a directory the user made: downloaded into
    loaded = data.load_fashion_mnist(tmp_path / "mine")
    assert loaded.source == str(tmp_path / "mine")
    assert not data.cache_dir().exists()
    assert_same(loaded, fixture_data)


def test_offline_message_lists_places(tmp_path, monkeypatch, closed_port_url):
    monkeypatch.setattr(data, "DEFAULT_MIRROR", closed_port_url)
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_fashion_mnist()
    message = str(info.value)
    for path in data.candidate_dirs():
        assert str(path) in message
    assert f"Downloading into {data.cache_dir()} failed: {closed_port_url}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "BNREF_DATA_DIR" in message
    assert isinstance(info.value.__cause__, data.DownloadError)
    assert not data.cache_dir().parent.parent.exists()  # no partial file, and no empty xdg-cache/bnref/ tree


# --- Real data (when present) ----------------------------------------------------------------


def test_real_fashion_mnist(real_fashion_dir):
    """conftest's session fixture searches the real places: it runs before `isolated`."""
    data.verify_checksums(real_fashion_dir)
    real = data.load_fashion_mnist(real_fashion_dir, download=False)
    assert real.train_images.shape == (60000, 28, 28) and real.train_images.dtype == np.uint8
    assert real.test_images.shape == (10000, 28, 28) and real.test_images.dtype == np.uint8
    assert real.train_labels.shape == (60000,) and real.train_labels.dtype == np.int64
    assert real.test_labels.shape == (10000,) and real.test_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(real.train_labels, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(real.test_labels, minlength=10), np.full(10, 1000))


# --- tensorflow-datasets ---------------------------------------------------------------------


def test_tfds_mock_data(tmp_path):
    """tfds.data_source + mock_data runs without TensorFlow (tfds.load would need it)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    with tfds.testing.mock_data(num_examples=7, data_dir=str(tmp_path)):
        loaded = data.load_fashion_mnist(source="tfds", download=False)
    assert loaded.source == "tfds"
    for split in ("train", "test"):
        images, labels = getattr(loaded, f"{split}_images"), getattr(loaded, f"{split}_labels")
        assert images.shape == (7, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (7,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() <= 9


def test_tfds_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'bnref\[tfds\]'"):
        data.load_fashion_mnist(source="tfds")


# --- CLI and import hygiene -------------------------------------------------------------------


def test_cli_reports_found_data(fixture_dir, capsys):
    assert data.main(["--data-dir", str(fixture_dir), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert f"Fashion-MNIST from {fixture_dir}" in out
    assert "checksums: differ from the original release" in out  # fixtures are not the real data
    assert "train: 12 images 28x28 uint8" in out and "test: 5 images 28x28 uint8" in out
    assert "    9  ankle boot      1" in out  # labels 0..11 % 10: class 9 once in train


def test_cli_not_found_exits_nonzero(tmp_path, capsys):
    assert data.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: Fashion-MNIST files not found" in captured.err and str(tmp_path / "nowhere") in captured.err


def test_synthetic_has_fashion_mnist_shapes_and_a_class_signal():
    from bnref.data import synthetic

    d = synthetic(100, 50, seed=3)
    assert d.train_images.shape == (100, 28, 28) and d.test_images.shape == (50, 28, 28)
    assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == np.int64
    k = int(d.train_labels[0])
    r, c = divmod(k, 4)
    assert np.all(d.train_images[0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] == 230)  # the class's block
    assert synthetic(100, 50, seed=3).train_images.tobytes() == d.train_images.tobytes()  # seeded


def test_load_or_synthetic_is_synthetic_only_when_asked(tmp_path, monkeypatch):
    from bnref import data

    monkeypatch.setenv("BNREF_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(data.DataNotFoundError, match="absent .*does not exist"):
        data.load_or_synthetic(n_train=40, n_test=20, seed=5)  # no files: an error, never a silent stand-in
    chosen = data.load_or_synthetic(synthetic_data=True, n_train=40, n_test=20, seed=5)
    assert chosen.source == "synthetic(seed=5)" and len(chosen.train_images) == 40
    huge = data.load_or_synthetic(synthetic_data=True, n_train=4_000_000, n_test=10**6)  # once allocated 25 GB
    assert (len(huge.train_labels), len(huge.test_labels)) == (60000, 10000)
    found = data.write_fashion_mnist(tmp_path / "d", data.synthetic(30, 10))
    assert data.load_or_synthetic(found).source == str(found)
    with pytest.raises(ValueError, match="--synthetic and --data-dir exclude each other"):
        data.load_or_synthetic(found, synthetic_data=True)
    (found / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")  # corrupt: an error
    with pytest.raises(ValueError):
        data.load_or_synthetic(found)


@pytest.mark.parametrize("where", ["data_dir", "env"])
def test_a_named_directory_that_does_not_exist_is_an_error_and_is_not_created(tmp_path, monkeypatch, mirror, where):
    monkeypatch.setattr(data, "DEFAULT_MIRROR", mirror.url)  # a download would succeed: it must not be tried
    typo = tmp_path / "typo" / "fashion"
    if where == "env":
        monkeypatch.setenv("BNREF_DATA_DIR", str(typo))
    with pytest.raises(data.DataNotFoundError, match=r"typo/fashion \((data_dir argument|\$BNREF_DATA_DIR)\) does not exist"):
        data.load_fashion_mnist(typo if where == "data_dir" else None)
    assert not (tmp_path / "typo").exists() and mirror.requests == []


def test_a_user_that_does_not_exist_in_the_path_is_a_value_error():
    with pytest.raises(ValueError, match="'~no-such-user-bnref/x' \\(data_dir argument\\): cannot expand"):
        data.load_fashion_mnist("~no-such-user-bnref/x", download=False)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink-loop", "dangling-symlink"])
def test_something_that_is_not_a_file_where_a_data_file_should_be_is_named(fixture_dir, kind):
    name = data.FILES["test_labels"]
    target = fixture_dir / name
    target.unlink()
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)  # a reader would block on it forever
    elif kind == "symlink-loop":
        os.symlink(target, target)
    else:
        os.symlink(fixture_dir / "nowhere", target)
    what = {"directory": "a directory", "fifo": "a FIFO", "symlink-loop": "a symlink that cannot be followed",
            "dangling-symlink": "a symlink that cannot be followed"}[kind]  # fmt: skip
    with pytest.raises(ValueError, match=f"{name} is {what}") as info:
        data.load_fashion_mnist(fixture_dir, download=False)
    assert "missing" not in str(info.value)


def test_an_unreadable_data_file_is_a_value_error_naming_it(fixture_dir, monkeypatch):
    real = data._open_maybe_gzip

    def denied(path):
        if path.name == data.FILES["train_labels"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(data, "_open_maybe_gzip", denied)  # as root, chmod 000 would not stop the read
    with pytest.raises(ValueError, match=f"{data.FILES['train_labels']}: cannot be read \\(Permission denied\\)"):
        data.load_fashion_mnist(fixture_dir, download=False)


def test_a_killed_downloads_part_file_is_removed_by_the_next_download(tmp_path, mirror):
    dest = tmp_path / "dest"
    dest.mkdir()
    name = data.FILES["train_images"]
    stale, live = dest / f".{name}.abc123.part", dest / f".{name}.def456.part"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"another download, still running")
    old = time.time() - data.STALE_PART_S - 60
    os.utime(stale, (old, old))
    data.download(dest, mirror.url, progress=False, checksums=checksums_of(mirror.root))
    assert not stale.exists() and live.exists()  # a recent one may belong to a download in progress


def test_the_content_digest_identifies_the_data(fixture_dir, tmp_path, fixture_data):
    a = data.load_fashion_mnist(fixture_dir, download=False)
    copy = data.write_fashion_mnist(tmp_path / "copy", fixture_data)
    assert data.load_fashion_mnist(copy, download=False).sha256 == a.sha256 and len(a.sha256) == 64
    other = data.write_fashion_mnist(tmp_path / "other", fake_dataset(seed=1))
    assert data.load_fashion_mnist(other, download=False).sha256 != a.sha256
