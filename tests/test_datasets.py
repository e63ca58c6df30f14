"""fastconv.datasets: the IDX parser, the folder search, downloading (never over the network
here: the fetch is replaced), and the real MNIST / Fashion-MNIST files when they are present."""

import dataclasses
import gzip
import hashlib
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_ROOT, wall_clock_limit

from fastconv import datasets
from fastconv.datasets import FILE_NAMES, fashion_mnist, mnist, read_idx

IMAGES, LABELS = datasets.SPLIT_FILES["train"]


def idx_bytes(array, type_code=0x08):
    """An IDX file's contents, written independently of the parser under test."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress=True):
    """Write ``data`` to ``path`` (+ ".gz" and gzip-compressed if ``compress``); return the path."""
    path = Path(f"{path}.gz") if compress else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_split(folder, images, labels, compress=True):
    write(folder / IMAGES, idx_bytes(images), compress)
    write(folder / LABELS, idx_bytes(labels), compress)


def small_digits(count=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    return images, (np.arange(count) % 10).astype(np.uint8)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No test sees the user's data folders or cache, or reaches the network."""
    monkeypatch.delenv("FASTCONV_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(datasets, "_fetch", no_network)


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_reads_images_and_labels(tmp_path, compress):
    images, labels = small_digits()
    assert np.array_equal(read_idx(write(tmp_path / "i", idx_bytes(images), compress)), images)
    assert np.array_equal(read_idx(write(tmp_path / "l", idx_bytes(labels), compress)), labels)


def test_read_idx_reads_wider_types_big_endian(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    parsed = read_idx(write(tmp_path / "ints", idx_bytes(values, type_code=0x0C)))
    assert parsed.dtype == np.int32 and np.array_equal(parsed, values)


def test_read_idx_truncated_data(tmp_path):
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path = write(tmp_path / "short", data[: 16 + 1000])
    with pytest.raises(
        ValueError, match=r"short\.gz: truncated: expected 2352 bytes .* found 1000"
    ):
        read_idx(path)


def test_read_idx_overlong_data(tmp_path):
    path = write(tmp_path / "long", idx_bytes(np.zeros(4, np.uint8)) + b"extra")
    with pytest.raises(ValueError, match=r"long\.gz: overlong: expected 4 bytes .* found 9"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = write(tmp_path / "header", bytes([0, 0, 8, 3, 0, 0, 0, 3]))
    with pytest.raises(ValueError, match="truncated header: expected 16 bytes"):
        read_idx(path)


@pytest.mark.parametrize(
    "contents, problem",
    [
        (b"\x89PNG\r\n\x1a\n", "not an IDX file: magic number 0x89504e47"),
        (b"", "not an IDX file: magic number missing"),
        (bytes([0, 0, 8, 0]), "not an IDX file"),  # zero dims
        (bytes([0, 0, 7, 1, 0, 0, 0, 0]), "unknown IDX type code 0x07"),
    ],
)
def test_read_idx_wrong_magic(tmp_path, contents, problem):
    with pytest.raises(ValueError, match=problem):
        read_idx(write(tmp_path / "bad", contents, compress=False))


def test_read_idx_corrupt_gzip(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt gzip data"):
        read_idx(path)


# --- dataset checks on small files --------------------------------------------------------


def test_small_dataset_loads_and_normalises(tmp_path):
    images, labels = small_digits()
    write_split(tmp_path, images, labels, compress=False)
    raw, got_labels = mnist(data_dir=tmp_path, download=False, normalize=False)
    assert raw.shape == (5, 1, 28, 28) and raw.dtype == np.float32
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    np.testing.assert_allclose(raw[:, 0], images / 255, atol=1e-7)
    normalised, _ = mnist(data_dir=tmp_path, download=False)
    expected = (images / 255 - datasets.MNIST_MEAN) / datasets.MNIST_STD
    np.testing.assert_allclose(normalised[:, 0], expected, atol=1e-5)
    fashion, _ = fashion_mnist(data_dir=tmp_path, download=False)
    expected = (images / 255 - datasets.FASHION_MNIST_MEAN) / datasets.FASHION_MNIST_STD
    np.testing.assert_allclose(fashion[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize(
    "images, labels, problem",
    [
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "expected 28x28 images"),
        (np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), "label 10 at index 1"),
        (
            np.zeros((3, 28, 28), np.uint8),
            np.zeros(2, np.uint8),
            "count mismatch: .* 3 images .* 2",
        ),
        (np.zeros(2, np.uint8), np.zeros(2, np.uint8), "expected uint8 images with 3 dims"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), "expected uint8 labels"),
    ],
    ids=["image-size", "label-range", "count-mismatch", "images-magic", "labels-magic"],
)
def test_structure_errors_name_the_problem(tmp_path, images, labels, problem):
    write_split(tmp_path, images, labels)
    with pytest.raises(ValueError, match=problem):
        mnist(data_dir=tmp_path, download=False)


def test_split_must_be_train_or_test():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'valid'"):
        mnist("valid")


# --- where the files are looked for ---------------------------------------------------------


def labels_found(loader=mnist, **kwargs):
    return loader(download=False, **kwargs)[1].tolist()


def test_search_order(tmp_path, monkeypatch):
    images, _ = small_digits(1)
    for name, label in [("arg", 1), ("env/mnist", 2), ("cache/fastconv/mnist", 3)]:
        write_split(tmp_path / name, images, np.array([label], np.uint8))
    monkeypatch.setenv("FASTCONV_DATA_DIR", str(tmp_path / "env"))  # a parent of mnist/
    assert labels_found(data_dir=tmp_path / "arg") == [1]
    assert labels_found(data_dir=tmp_path / "nothing-here") == [2]
    monkeypatch.delenv("FASTCONV_DATA_DIR")
    assert labels_found() == [3]


def test_data_dir_may_be_the_folder_or_its_parent(tmp_path):
    images, labels = small_digits()
    write_split(tmp_path / "fashion-mnist", images, labels)
    assert labels_found(fashion_mnist, data_dir=tmp_path) == labels.tolist()
    assert labels_found(fashion_mnist, data_dir=tmp_path / "fashion-mnist") == labels.tolist()


def test_fashion_mnist_is_never_read_from_an_mnist_folder(tmp_path):
    write_split(tmp_path / "mnist", *small_digits())
    with pytest.raises(FileNotFoundError):
        fashion_mnist(data_dir=tmp_path / "mnist", download=False)


def test_fashion_mnist_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_split(system, *small_digits())
    source = dataclasses.replace(datasets._FASHION_MNIST, system_dirs=(str(system),))
    monkeypatch.setattr(datasets, "_FASHION_MNIST", source)
    assert len(labels_found(fashion_mnist)) == 5


def test_missing_offline_says_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        mnist("test", data_dir=tmp_path / "mine", download=False)
    message = str(error.value)
    for needed in [*FILE_NAMES, str(tmp_path / "mine"), str(tmp_path / "cache" / "fastconv")]:
        assert needed in message
    assert "--data-dir" in message and "FASTCONV_DATA_DIR" in message


# --- downloading (fetch replaced) ----------------------------------------------------------


def publish(monkeypatch, files):
    """Make every mirror serve ``files`` ({name: IDX bytes}) gzipped, with their MD5s as the
    published ones; return the list that collects the URLs fetched."""
    served = {f"{name}.gz": gzip.compress(data, mtime=0) for name, data in files.items()}
    md5s = {name: hashlib.md5(served[f"{name}.gz"]).hexdigest() for name in files}
    monkeypatch.setattr(datasets, "_MNIST", dataclasses.replace(datasets._MNIST, gz_md5=md5s))
    fetched = []

    def fetch(url):
        fetched.append(url)
        return served[url.rsplit("/", 1)[1]]

    monkeypatch.setattr(datasets, "_fetch", fetch)
    return fetched


def small_files():
    images, labels = small_digits()
    return {IMAGES: idx_bytes(images), LABELS: idx_bytes(labels)}


def cache_contents(tmp_path):
    cache = tmp_path / "cache" / "fastconv" / "mnist"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_writes_into_the_cache_and_loads(tmp_path, monkeypatch):
    fetched = publish(monkeypatch, small_files())
    images, labels = small_digits()
    got_images, got_labels = mnist(normalize=False)
    assert np.array_equal(got_labels, labels)
    np.testing.assert_allclose(got_images[:, 0] * 255, images, atol=1e-4)
    assert cache_contents(tmp_path) == sorted([f"{IMAGES}.gz", f"{LABELS}.gz"])
    assert all(url.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for url in fetched)
    fetched.clear()
    mnist()  # found in the cache now: nothing downloaded again
    assert fetched == []


def test_download_fetches_only_missing_files(tmp_path, monkeypatch):
    files = small_files()
    fetched = publish(monkeypatch, files)
    write(tmp_path / "cache" / "fastconv" / "mnist" / LABELS, files[LABELS])
    mnist()
    assert [url.rsplit("/", 1)[1] for url in fetched] == [f"{IMAGES}.gz"]


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    publish(monkeypatch, small_files())
    monkeypatch.setattr(datasets, "_fetch", lambda url: b"<html>captive portal</html>")
    with pytest.raises(
        FileNotFoundError, match=r"MD5 mismatch: expected [0-9a-f]{32}, got"
    ) as error:
        mnist()
    assert str(error.value).count("MD5 mismatch") == len(datasets._MNIST.mirrors)
    assert cache_contents(tmp_path) == []


def test_unreachable_mirror_falls_back_to_the_next(tmp_path, monkeypatch):
    fetched = publish(monkeypatch, small_files())
    serve = datasets._fetch

    def first_mirror_down(url):
        if url.startswith(datasets._MNIST.mirrors[0]):
            raise urllib.error.URLError("connection refused")
        return serve(url)

    monkeypatch.setattr(datasets, "_fetch", first_mirror_down)
    assert len(mnist()[1]) == 5
    assert all(url.startswith(datasets._MNIST.mirrors[1]) for url in fetched)


def test_offline_raises_file_not_found_with_instructions(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "_fetch", offline)
    with pytest.raises(FileNotFoundError) as error:
        mnist()
    message = str(error.value)
    assert all(name in message for name in FILE_NAMES)
    assert "FASTCONV_DATA_DIR" in message and "Download failed" in message
    assert "name resolution" in message and datasets._MNIST.mirrors[1] in message
    assert cache_contents(tmp_path) == []


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    publish(monkeypatch, small_files())

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        mnist()
    assert cache_contents(tmp_path) == []


# --- the real files, when present ------------------------------------------------------------

REAL_ROOT = DATA_ROOT
# MD5 of the decompressed MNIST files (/work/shared/data/README.md): a checksum of every pixel.
MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def load_real(loader, split, normalize=True):
    try:
        return loader(split, data_dir=REAL_ROOT, download=False, normalize=normalize)
    except FileNotFoundError:
        pytest.skip(f"no {loader.__name__} files under {REAL_ROOT} (set FASTCONV_DATA_DIR)")


def raw_files_md5(images, labels):
    """MD5 of the IDX files these arrays came from, rebuilt from the arrays themselves."""
    pixels = np.rint(images[:, 0] * 255).astype(np.uint8)
    return (
        hashlib.md5(idx_bytes(pixels)).hexdigest(),
        hashlib.md5(idx_bytes(labels.astype(np.uint8))).hexdigest(),
    )


@pytest.mark.parametrize("loader", [mnist, fashion_mnist])
@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_real_shapes_dtypes_and_classes(loader, split, count):
    images, labels = load_real(loader, split)
    assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (count,) and labels.dtype == np.int64
    histogram = np.bincount(labels, minlength=10)
    assert len(histogram) == 10 and histogram.min() > count // 20, histogram
    if loader is fashion_mnist:  # perfectly balanced by construction
        assert (histogram == count // 10).all()


@pytest.mark.parametrize("loader", [mnist, fashion_mnist])
def test_real_training_set_is_normalised(loader):
    images, _ = load_real(loader, "train")
    assert abs(images.mean(dtype=np.float64)) < 0.01
    assert abs(images.std(dtype=np.float64) - 1) < 0.01


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_mnist_pixels_match_the_published_checksums(split):
    images, labels = load_real(mnist, split, normalize=False)
    names = datasets.SPLIT_FILES[split]
    assert raw_files_md5(images, labels) == (MNIST_RAW_MD5[names[0]], MNIST_RAW_MD5[names[1]])


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_fashion_mnist_pixels_match_an_independent_gunzip(split):
    images, labels = load_real(fashion_mnist, split, normalize=False)
    folder = REAL_ROOT / "fashion-mnist"
    expected = tuple(
        hashlib.md5(gzip.decompress((folder / f"{name}.gz").read_bytes())).hexdigest()
        for name in datasets.SPLIT_FILES[split]
    )
    assert raw_files_md5(images, labels) == expected


def test_real_mnist_download_checks_the_published_md5(tmp_path, monkeypatch):
    """The real mirror bytes, served locally, pass the real published MD5s and load the same."""
    local = load_real(mnist, "test")
    folder = REAL_ROOT / "mnist"
    monkeypatch.setattr(
        datasets, "_fetch", lambda url: (folder / url.rsplit("/", 1)[1]).read_bytes()
    )
    downloaded = mnist("test")
    assert np.array_equal(downloaded[0], local[0]) and np.array_equal(downloaded[1], local[1])
    assert cache_contents(tmp_path) == sorted(f"{name}.gz" for name in datasets.SPLIT_FILES["test"])


def test_real_mnist_train_reads_fast():
    load_real(mnist, "test")  # skips when absent
    start = time.perf_counter()
    mnist("train", data_dir=REAL_ROOT, download=False)
    # Measured ~0.2-0.3 s; the bound only catches a per-pixel Python loop creeping in.
    assert time.perf_counter() - start < wall_clock_limit(10)
