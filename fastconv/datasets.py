"""MNIST and Fashion-MNIST: find the four IDX files, download them if allowed, parse them.

Imports only NumPy and the standard library, so data can be read before the kernels are built.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import atomic_write

# Per-dataset statistics of pixel/255 over the training set, as the literature normalises.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = SPLIT_FILES["train"] + SPLIT_FILES["test"]
DOWNLOAD_TIMEOUT = 60  # seconds without data before a mirror is given up

# IDX type code (third byte of the magic number) -> element type; IDX stores big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class _Source:
    title: str  # for messages
    folder: str  # subfolder name under a data root and under the cache
    mean: float
    std: float
    mirrors: tuple[str, ...]
    gz_md5: dict[str, str]  # published MD5 of each downloaded .gz
    system_dirs: tuple[str, ...] = ()  # where OS packages install the files


_MNIST = _Source(
    "MNIST", "mnist", MNIST_MEAN, MNIST_STD,
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    gz_md5={
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)  # fmt: skip
_FASHION_MNIST = _Source(
    "Fashion-MNIST", "fashion-mnist", FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    gz_md5={
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
)  # fmt: skip
_KNOWN_FOLDERS = {_MNIST.folder, _FASHION_MNIST.folder}


def mnist(split="train", data_dir=None, download=True, normalize=True):
    """MNIST digits as ``(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000). Images are ``pixel/255``, then
    ``(x - MNIST_MEAN) / MNIST_STD`` unless ``normalize=False``. The folder is searched in
    ``data_dir``, ``$FASTCONV_DATA_DIR`` (either may hold the files or an ``mnist/`` subfolder),
    then the user cache; if absent there and ``download`` is true, the files are downloaded into
    the cache, else ``FileNotFoundError`` says where to put them.
    """
    return _load(_MNIST, split, data_dir, download, normalize)


def fashion_mnist(split="train", data_dir=None, download=True, normalize=True):
    """Fashion-MNIST, exactly as :func:`mnist` (subfolder ``fashion-mnist/``, its own mean/std)."""
    return _load(_FASHION_MNIST, split, data_dir, download, normalize)


def dataset_spec(name: str) -> dict:
    """What ``fastconv train``/``evaluate`` show and store of a dataset: ``title``, ``classes``,
    and the ``mean``/``std`` its images are normalised with."""
    if name == "mnist":
        return {
            "title": "MNIST",
            "classes": [str(i) for i in range(10)],
            "mean": MNIST_MEAN,
            "std": MNIST_STD,
        }
    if name == "fashion-mnist":
        return {
            "title": "Fashion-MNIST",
            "classes": list(FASHION_CLASSES),
            "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD,
        }
    raise ValueError(f"dataset: expected 'mnist' or 'fashion-mnist', got {name!r}")


def load_dataset(name: str, split: str, data_dir=None, download: bool = True):
    """``(x, y)`` of ``split`` of the dataset called ``name`` (see :func:`dataset_spec`)."""
    dataset_spec(name)
    loader = mnist if name == "mnist" else fashion_mnist
    return loader(split, data_dir=data_dir, download=download)


def read_idx(path) -> np.ndarray:
    """Parse one IDX file, gzip-compressed or raw, into an array of the shape its header gives.

    Byte-typed arrays are read-only views of the file's bytes (copy to modify). Raises
    ``ValueError`` naming the file for a bad magic number, an unknown type code, or data that is
    shorter or longer than the product of the dims.
    """
    data = _read_bytes(path)
    magic = data[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number {'0x' + magic.hex() if magic else 'missing'}, "
            "expected 0x0000TTDD (TT type code, DD >= 1 dims; 0x00000803 images, 0x00000801 labels)"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x} in the magic number")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated header: expected {header_size} bytes for {ndim} dims, "
            f"found {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected, found = math.prod(shape) * dtype.itemsize, len(data) - header_size
    if found != expected:
        problem = "truncated" if found < expected else "overlong"
        raise ValueError(
            f"{path}: {problem}: expected {expected} bytes of data for shape {shape}, found {found}"
        )
    array = np.frombuffer(data, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x1f\x8b":  # the gzip magic; judge by content, not by the name
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data: {err}") from err


def _load(source, split, data_dir, download, normalize):
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = SPLIT_FILES[split]
    searched = _search_dirs(source, data_dir)
    paths = _find(names, searched)
    if paths is None and download:
        paths = _download(source, names, searched)
    if paths is None:
        raise FileNotFoundError(_missing_message(source, searched))
    images_path, labels_path = paths
    images, labels = read_idx(images_path), read_idx(labels_path)
    _check_pair(images, labels, images_path, labels_path)

    pixels = images.reshape(len(images), 1, 28, 28).astype(np.float32)
    pixels /= 255  # in place: the train set is 188 MB as float32, so avoid temporaries
    if normalize:
        pixels -= np.float32(source.mean)
        pixels /= np.float32(source.std)
    return pixels, labels.astype(np.int64)


def _check_pair(images, labels, images_path, labels_path):
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images with 3 dims (magic 0x00000803), "
            f"found {images.dtype} with {images.ndim} dims"
        )
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected 28x28 images, found {images.shape[1:]}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels with 1 dim (magic 0x00000801), "
            f"found {labels.dtype} with {labels.ndim} dims"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"count mismatch: {images_path} holds {len(images)} images "
            f"but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() > 9:
        index = int(np.argmax(labels > 9))
        raise ValueError(f"{labels_path}: label {labels[index]} at index {index} is not in 0..9")


def _search_dirs(source, data_dir) -> list[Path]:
    dirs = []
    for root in (data_dir, os.environ.get("FASTCONV_DATA_DIR")):
        if root:
            root = Path(root).expanduser()
            dirs.append(root / source.folder)
            # A folder named after the other dataset holds files of the same names: never
            # mistake Fashion-MNIST for MNIST or the reverse.
            if root.name not in _KNOWN_FOLDERS - {source.folder}:
                dirs.append(root)
    dirs.append(_cache_dir(source))
    dirs.extend(Path(d) for d in source.system_dirs)
    return dirs


def _cache_dir(source) -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "fastconv" / source.folder


def _find(names, folders):
    """The first folder's paths to all of ``names``, each gzip or raw, or None."""
    for folder in folders:
        paths = [_existing(folder / name) for name in names]
        if all(paths):
            return paths
    return None


def _existing(path):
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.is_file():
            return candidate
    return None


def _download(source, names, searched):
    folder = _cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = _existing(folder / name)
        if path is None:
            path = folder / f"{name}.gz"
            _download_file(source, name, path, searched)
        paths.append(path)
    return paths


def _download_file(source, name, path, searched):
    """Try each mirror in turn; keep the first response whose MD5 is the published one."""
    failures = []
    for mirror in source.mirrors:
        url = f"{mirror}{name}.gz"
        try:
            data = _fetch(url)
        except OSError as err:  # URLError, HTTPError and timeouts are all OSErrors
            failures.append(f"{url}: {err}")
            continue
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != source.gz_md5[name]:
            failures.append(f"{url}: MD5 mismatch: expected {source.gz_md5[name]}, got {digest}")
            continue
        _write_file(path, data)
        return
    details = "\n".join(f"  {failure}" for failure in failures)
    raise FileNotFoundError(f"{_missing_message(source, searched)}\nDownload failed:\n{details}")


def _fetch(url) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        return response.read()


def _write_file(path, data):
    """Readers see either no file or the whole file, even if this process dies mid-write."""
    with atomic_write(path) as f:
        f.write(data)


def _missing_message(source, searched):
    folders = "\n".join(f"  {folder}" for folder in searched)
    return (
        f"{source.title} data not found. Needed: {', '.join(FILE_NAMES)} "
        f"(each gzip .gz or raw). Searched:\n{folders}\n"
        f"Put the files in one of these folders, or pass --data-dir DIR (data_dir=DIR) or set "
        f"FASTCONV_DATA_DIR=DIR, where DIR holds the files or a '{source.folder}/' subfolder "
        f"of them; or allow downloading (download=True) while online."
    )
