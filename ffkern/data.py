"""Datasets for Forward-Forward training: loading, validation, IDX files and downloads.

Every loader returns a :class:`Dataset` whose images are flattened to rows of
``D = C * H * W`` float32 features in ``[0, 1]`` and whose labels are int64 class indices.

Datasets
--------
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, pixel values 0..16, divided
    by 16). Needs no files and no network, so it is the offline default. The split is fixed:
    stratified by class, 1500 training and 297 test images, drawn with the seed
    ``DIGITS_SPLIT_SEED`` that no user seed changes, so every run sees the same test set.
``mnist`` and ``fashion-mnist``
    A folder with the four standard IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each
    plain or gzip-compressed with a ``.gz`` suffix. Where both forms of a file exist the plain
    one is read, since it needs no decompression. Pixels are divided by 255; the image size is
    taken from the file header, so any ``H x W`` works (``export_idx`` relies on this).
``cifar10``
    The "CIFAR-10 python version": pickled batches ``data_batch_1`` .. ``data_batch_5`` and
    ``test_batch``, found in the data folder itself, in its ``cifar-10-batches-py`` subfolder,
    or extracted from a ``cifar-10-python.tar.gz`` in the data folder. Pixels are divided by
    255 and keep the file's channel-major layout, so ``image_shape`` is ``(3, 32, 32)``.

IDX layout
----------
Two zero bytes, a dtype code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``ndim``; then ``ndim`` big-endian
uint32 sizes; then the values, big-endian, in row-major order.

Files on disk
-------------
Where ``data_dir`` is not given, files live in ``$FFKERN_DATA_DIR/<name>`` or, without that
variable, in ``~/.cache/ffkern/<name>``. Everything this module writes (IDX files, downloads,
extracted archives) is written under a temporary name in the destination folder and renamed
into place only once complete, so a final file name never holds a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import math
import os
import pathlib
import pickle
import secrets
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DIGITS_SPLIT_SEED",
    "Dataset",
    "download_dataset",
    "export_idx",
    "load_dataset",
    "read_idx",
    "validate_arrays",
    "write_idx",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")

# Seed of the digits train/test split. It is part of the dataset's definition, not a training
# knob: changing it changes which images are test images and breaks comparisons across runs.
DIGITS_SPLIT_SEED = 20221227
_DIGITS_TRAIN_SIZE = 1500
_DIGITS_TEST_SIZE = 297

_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10}

# IDX dtype code -> big-endian numpy dtype of the stored values.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# MNIST-style file names, keyed by (split, kind); ``t10k`` is the test split.
_IDX_FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_IMAGE_SHAPE = (3, 32, 32)
_CIFAR_FEATURES = 3 * 32 * 32


@dataclass(frozen=True)
class _Source:
    """Where a dataset's files are published, with the md5 digest of each file."""

    base_url: str
    files: tuple[tuple[str, str], ...]  # (file name, md5 hex digest)


# The one table of download locations and checksums.
_SOURCES: dict[str, _Source] = {
    "mnist": _Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion-mnist": _Source(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83fd310"),
        ),
    ),
    "cifar10": _Source(
        "https://www.cs.toronto.edu/~kriz/",
        ((_CIFAR_TARBALL, "c58f30108f718f92721af3b95e74349a"),),
    ),
}

_DOWNLOAD_TIMEOUT_S = 60.0  # seconds without data before a download is abandoned
_CHUNK_BYTES = 1 << 20  # write and hash in 1 MiB pieces so large files are never copied whole


# ------------------------------------------------------------------------------------------------
# The dataset container
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A labelled image dataset with a fixed train/test split, flattened to feature rows.

    ``x_train`` and ``x_test`` are float32 ``(N, D)`` with ``D == C * H * W`` (channel-major
    flattening of ``image_shape``); ``y_train`` and ``y_test`` are int64 ``(N,)`` labels in
    ``[0, num_classes)``. All four tensors share one device.

    Construction checks shapes, dtypes and devices but not the values (that needs a host sync;
    the loaders call :func:`validate_arrays` for it). Equality is identity (``eq=False``):
    comparing datasets field by field would compare tensors, which has no single truth value.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        tensors = {
            "x_train": self.x_train,
            "y_train": self.y_train,
            "x_test": self.x_test,
            "y_test": self.y_test,
        }
        for field, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Dataset.{field} must be a torch.Tensor, got {type(value).__name__}"
                )
        for field in ("x_train", "x_test"):
            value = tensors[field]
            if value.dtype != torch.float32:
                raise TypeError(f"Dataset.{field} must be float32, got {value.dtype}")
            if value.ndim != 2:
                raise ValueError(
                    f"Dataset.{field} must be 2-D (samples, features), "
                    f"got shape {tuple(value.shape)}"
                )
        for field in ("y_train", "y_test"):
            value = tensors[field]
            if value.dtype != torch.int64:
                raise TypeError(f"Dataset.{field} must be int64, got {value.dtype}")
            if value.ndim != 1:
                raise ValueError(
                    f"Dataset.{field} must be 1-D (samples,), got shape {tuple(value.shape)}"
                )
        for split in ("train", "test"):
            n_x = tensors[f"x_{split}"].shape[0]
            n_y = tensors[f"y_{split}"].shape[0]
            if n_x != n_y:
                raise ValueError(f"Dataset {split} split has {n_x} images but {n_y} labels")

        shape = self.image_shape
        if (
            not isinstance(shape, tuple)
            or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(
                f"Dataset.image_shape must be a tuple of three positive ints (C, H, W), "
                f"got {shape!r}"
            )
        features = math.prod(shape)
        for field in ("x_train", "x_test"):
            if tensors[field].shape[1] != features:
                raise ValueError(
                    f"Dataset.{field} has {tensors[field].shape[1]} features but image_shape "
                    f"{shape} implies {features}"
                )
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or self.num_classes < 1
        ):
            raise ValueError(
                f"Dataset.num_classes must be a positive int, got {self.num_classes!r}"
            )
        devices = {field: value.device for field, value in tensors.items()}
        if len(set(devices.values())) != 1:
            raise ValueError(f"Dataset tensors must share one device, got {devices}")

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with all four tensors moved to ``device`` (no copy where already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    @property
    def num_features(self) -> int:
        """Length ``D = C * H * W`` of one flattened image."""
        return int(self.x_train.shape[1])

    @property
    def device(self) -> torch.device:
        """Device holding the tensors."""
        return self.x_train.device

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape[0]}, "
            f"test={self.x_test.shape[0]}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validate_arrays(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str) -> None:
    """Check one split's images and labels, raising ``ValueError`` that names the problem.

    Checks, in order: ``x`` is 2-D and ``y`` 1-D, both hold the same non-zero number of
    samples, ``y`` has an integer dtype, ``x`` (when floating point) holds no NaN or Inf, and
    every label lies in ``[0, num_classes)``. ``what`` names the split in the messages, e.g.
    ``"mnist train"``. The value checks synchronise with the device; call this when loading,
    not in a training loop.
    """
    for arg, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError(f"{what}: num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"{what}: num_classes must be at least 1, got {num_classes}")

    if x.ndim != 2:
        raise ValueError(f"{what}: x must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if y.ndim != 1:
        raise ValueError(f"{what}: y must be 1-D (samples,), got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the split holds no samples (x has shape {tuple(x.shape)})")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")

    if x.dtype.is_floating_point:
        bad = ~torch.isfinite(x)
        n_bad = int(bad.sum())  # deliberate host sync: loading time only
        if n_bad:
            n_nan = int(torch.isnan(x).sum())
            row, col = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"{what}: x holds {n_bad} NaN or Inf values ({n_nan} NaN, {n_bad - n_nan} Inf); "
                f"the first is {x[row, col].item()} at index ({row}, {col})"
            )

    outside = (y < 0) | (y >= num_classes)
    n_outside = int(outside.sum())  # deliberate host sync: loading time only
    if n_outside:
        first = int(torch.nonzero(outside)[0, 0])
        raise ValueError(
            f"{what}: {n_outside} labels lie outside the range [0, {num_classes}); "
            f"the first is label {int(y[first])} at index {first}"
        )


# ------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed, into a native-byte-order numpy array.

    Compression is detected from the gzip magic bytes ``1f 8b``, not from the file name, so a
    compressed file without ``.gz`` and a plain file with it both read correctly. Raises
    ``ValueError`` naming the file for a corrupt gzip stream, a wrong magic number, an unknown
    dtype code, a truncated header, or a payload whose size disagrees with the header.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as fh:
        compressed = fh.read(2) == _GZIP_MAGIC
    if compressed:
        try:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise ValueError(f"IDX file {path}: corrupt gzip data ({err})") from err
    else:
        raw = path.read_bytes()

    if len(raw) < 4:
        raise ValueError(
            f"IDX file {path}: truncated header, expected at least 4 bytes of magic number, "
            f"got {len(raw)}"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"IDX file {path}: wrong magic number, expected the first two bytes 0x00 0x00, "
            f"got 0x{raw[0]:02x} 0x{raw[1]:02x} (not an IDX file?)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(
            f"IDX file {path}: wrong magic number, unknown dtype code 0x{code:02x}; "
            f"expected one of {known}"
        )
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(
            f"IDX file {path}: truncated header, {ndim} dimensions need {header_bytes} bytes, "
            f"got {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    actual = len(raw) - header_bytes
    if actual != expected:
        problem = "truncated" if actual < expected else "oversized"
        raise ValueError(
            f"IDX file {path}: {problem} payload, shape {shape} of {dtype.name} needs "
            f"{expected} bytes after the header, got {actual}"
        )
    values = np.frombuffer(raw, dtype=dtype, count=count, offset=header_bytes)
    # astype copies into native byte order and gives a writable array that owns its memory.
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def _idx_code(dtype: np.dtype) -> int:
    for code, stored in _IDX_DTYPES.items():
        if stored.kind == dtype.kind and stored.itemsize == dtype.itemsize:
            return code
    supported = ", ".join(d.newbyteorder("=").name for d in _IDX_DTYPES.values())
    raise TypeError(f"write_idx: dtype {dtype} has no IDX code; expected one of {supported}")


def _write_idx_stream(fh: BinaryIO, header: bytes, payload: np.ndarray) -> None:
    """Write an IDX header and a contiguous payload in chunks (no whole-array byte copy)."""
    fh.write(header)
    flat = payload.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK_BYTES):
        fh.write(memoryview(flat[start : start + _CHUNK_BYTES]))


@contextlib.contextmanager
def _atomic_output(path: pathlib.Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the ``with`` block finishes.

    The data goes to a uniquely named temporary file in the same folder (so the final rename is
    atomic on POSIX and Windows), is flushed to disk, then renamed over ``path``. On any error
    the temporary file is deleted and ``path`` keeps its previous contents, if any. The file is
    created with mode 0666 minus the umask, like any ordinary file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends in ``.gz``.

    Intended for uint8 images and labels (MNIST's format); the other IDX dtypes (int8, int16,
    int32, float32, float64) are written too. The file appears under its final name only once
    complete (temporary file plus ``os.replace``). Raises ``TypeError`` for a dtype IDX cannot
    store and ``ValueError`` for 0-D arrays, more than 255 dimensions or a size >= 2**32.
    """
    path = pathlib.Path(path)
    array = np.asarray(array)
    code = _idx_code(array.dtype)
    if not 1 <= array.ndim <= 255:
        raise ValueError(
            f"write_idx: IDX stores 1 to 255 dimensions, got a {array.ndim}-D array for {path}"
        )
    if any(size >= 2**32 for size in array.shape):
        raise ValueError(f"write_idx: IDX sizes are uint32, got shape {array.shape} for {path}")
    header = bytes((0, 0, code, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code])

    with _atomic_output(path) as raw_fh:
        if path.suffix == ".gz":
            # mtime=0 and a fixed stored name make the output byte-for-byte reproducible.
            with gzip.GzipFile(filename=path.stem, mode="wb", fileobj=raw_fh, mtime=0) as fh:
                _write_idx_stream(fh, header, payload)
        else:
            _write_idx_stream(raw_fh, header, payload)


def export_idx(dataset: Dataset, out_dir: str | os.PathLike[str]) -> None:
    """Write a single-channel dataset as the four MNIST-named IDX files in ``out_dir``.

    Pixels are mapped from ``[0, 1]`` to ``round(255 * x)`` as uint8 (values outside are
    clamped, with a warning), labels are written as uint8. The files are uncompressed and are
    read back by ``load_dataset("mnist", out_dir)``; this is how MNIST-format files are made
    from the bundled digits. ``out_dir`` is created if missing.
    """
    channels, height, width = dataset.image_shape
    if channels != 1:
        raise ValueError(
            f"export_idx writes single-channel images; dataset {dataset.name!r} has image "
            f"shape {dataset.image_shape}, expected (1, H, W)"
        )
    if dataset.num_classes > 256:
        raise ValueError(
            f"export_idx writes uint8 labels, which hold at most 256 classes; dataset "
            f"{dataset.name!r} has {dataset.num_classes}"
        )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    splits = {
        "train": (dataset.x_train, dataset.y_train),
        "test": (dataset.x_test, dataset.y_test),
    }
    for split, (x, y) in splits.items():
        validate_arrays(x, y, dataset.num_classes, f"{dataset.name} {split}")
        x = x.detach().cpu()
        if bool((x < 0).any()) or bool((x > 1).any()):
            logger.warning(
                "export_idx: %s %s pixels lie outside [0, 1] (min %g, max %g); clamping",
                dataset.name,
                split,
                float(x.min()),
                float(x.max()),
            )
        pixels = torch.round(x * 255).clamp_(0, 255).to(torch.uint8).numpy()
        labels = y.detach().cpu().to(torch.uint8).numpy()
        write_idx(out / _IDX_FILES[(split, "images")], pixels.reshape(-1, height, width))
        write_idx(out / _IDX_FILES[(split, "labels")], labels)
    logger.info("exported %s as MNIST-format IDX files to %s", dataset.name, out)


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def _resolve_dir(name: str, data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    root = os.environ.get("FFKERN_DATA_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "ffkern"
    return base.expanduser() / name


def _to_tensors(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, D)`` images and integer labels -> float32 ``x / 255`` and int64 on ``device``.

    The uint8 data is moved first and converted on the device, which moves a quarter of the
    bytes a float32 copy would.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64, copy=False)).to(device)
    return x, y


def _load_digits(device: torch.device) -> Dataset:
    # Imported here: scikit-learn takes about a second to import and only digits needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32)  # exact: every value is k / 16
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]),
        train_size=_DIGITS_TRAIN_SIZE,
        test_size=_DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    x_train = torch.from_numpy(images[train_idx]).to(device)
    y_train = torch.from_numpy(labels[train_idx]).to(device)
    x_test = torch.from_numpy(images[test_idx]).to(device)
    y_test = torch.from_numpy(labels[test_idx]).to(device)
    validate_arrays(x_train, y_train, _NUM_CLASSES["digits"], "digits train")
    validate_arrays(x_test, y_test, _NUM_CLASSES["digits"], "digits test")
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, (1, 8, 8))


def _find_idx_files(folder: pathlib.Path) -> dict[tuple[str, str], pathlib.Path | None]:
    found: dict[tuple[str, str], pathlib.Path | None] = {}
    for key, base in _IDX_FILES.items():
        plain, packed = folder / base, folder / f"{base}.gz"
        found[key] = plain if plain.is_file() else packed if packed.is_file() else None
    return found


def _read_idx_split(
    images_path: pathlib.Path, labels_path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Read one split's image and label files; return ``(N, H*W)`` uint8, labels, ``(H, W)``."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise ValueError(
            f"IDX images file {images_path}: expected 3-D data (images, rows, columns), "
            f"got {images.ndim}-D with shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"IDX images file {images_path}: expected uint8 pixels (dtype code 0x08), "
            f"got {images.dtype}"
        )
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise ValueError(
            f"IDX labels file {labels_path}: expected 1-D data (labels,), "
            f"got {labels.ndim}-D with shape {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"IDX labels file {labels_path}: expected integer labels, got {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"IDX image and label counts differ: {images_path.name} holds {images.shape[0]} "
            f"images but {labels_path.name} holds {labels.shape[0]} labels"
        )
    count, height, width = images.shape
    return images.reshape(count, height * width), labels, (height, width)


def _load_idx_dataset(
    name: str, folder: pathlib.Path, download: bool, device: torch.device
) -> Dataset:
    paths = _find_idx_files(folder)
    if download and None in paths.values():
        download_dataset(name, folder)
        paths = _find_idx_files(folder)
    missing = [_IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"{name}: folder {folder} lacks {', '.join(missing)} (plain or with .gz); it must "
            f"hold {', '.join(_IDX_FILES.values())}. Fetch them with --download or "
            f"ffkern.data.download_dataset({name!r}, {str(folder)!r})"
        )

    found = {key: path for key, path in paths.items() if path is not None}
    arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for split in ("train", "test"):
        images, labels, sizes[split] = _read_idx_split(
            found[(split, "images")], found[(split, "labels")]
        )
        x, y = _to_tensors(images, labels, device)
        validate_arrays(x, y, _NUM_CLASSES[name], f"{name} {split}")
        arrays[split] = (x, y)
    if sizes["train"] != sizes["test"]:
        raise ValueError(
            f"{name}: train images are {sizes['train'][0]}x{sizes['train'][1]} but test "
            f"images are {sizes['test'][0]}x{sizes['test'][1]} in {folder}"
        )
    height, width = sizes["train"]
    return Dataset(name, *arrays["train"], *arrays["test"], _NUM_CLASSES[name], (1, height, width))


def _check_tar_member(tarball: pathlib.Path, member: tarfile.TarInfo) -> None:
    name = member.name
    posix = pathlib.PurePosixPath(name)
    windows = pathlib.PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("\\"):
        raise ValueError(f"refusing to extract {tarball}: member {name!r} has an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(
            f"refusing to extract {tarball}: member {name!r} has a '..' path component"
        )
    if not (member.isfile() or member.isdir()):
        raise ValueError(
            f"refusing to extract {tarball}: member {name!r} is a link or special file; "
            f"only regular files and folders are extracted"
        )


def _safe_extract(tarball: pathlib.Path, dest: pathlib.Path) -> None:
    """Extract ``tarball`` into ``dest`` after checking every member, file by file atomically.

    Members with absolute paths, ``..`` components, links or device entries are refused before
    anything is written. Extraction goes to a temporary folder inside ``dest``; each finished
    file is then renamed into place, so an interrupted extraction leaves no truncated batch.
    """
    logger.info("extracting %s into %s", tarball, dest)
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_tar_member(tarball, member)
            staging = pathlib.Path(tempfile.mkdtemp(prefix=".ffkern-extract-", dir=dest))
            try:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)  # members checked above
                for extracted in sorted(staging.rglob("*")):
                    if extracted.is_file():
                        target = dest / extracted.relative_to(staging)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(extracted, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"could not read archive {tarball}: {err}") from err


def _find_cifar_folder(root: pathlib.Path) -> pathlib.Path | None:
    names = (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH)
    for folder in (root, root / _CIFAR_SUBDIR):
        if all((folder / name).is_file() for name in names):
            return folder
    return None


def _batch_entry(batch: dict, key: str, path: pathlib.Path) -> object:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(
        f"CIFAR-10 batch {path}: missing key {key.encode()!r}; found keys {sorted(map(str, batch))}"
    )


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch into uint8 ``(n, 3072)`` pixels and int64 labels.

    Unpickling can run arbitrary code: the batch files must come from a trusted source (the
    official archive, checked against its md5 by ``download_dataset``).
    """
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"CIFAR-10 batch {path}: could not unpickle ({err!r})") from err
    if not isinstance(batch, dict):
        raise ValueError(
            f"CIFAR-10 batch {path}: expected a pickled dict, got {type(batch).__name__}"
        )
    data = np.asarray(_batch_entry(batch, "data", path))
    labels = np.asarray(_batch_entry(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_FEATURES:
        raise ValueError(
            f"CIFAR-10 batch {path}: expected b'data' as uint8 of shape (n, {_CIFAR_FEATURES}), "
            f"got {data.dtype} of shape {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"CIFAR-10 batch {path}: expected {data.shape[0]} labels to match the images, "
            f"got b'labels' of shape {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"CIFAR-10 batch {path}: expected integer labels, got {labels.dtype}")
    return data, labels.astype(np.int64)


def _load_cifar10(root: pathlib.Path, download: bool, device: torch.device) -> Dataset:
    folder = _find_cifar_folder(root)
    tarball = root / _CIFAR_TARBALL
    if folder is None and download and not tarball.is_file():
        download_dataset("cifar10", root)
    if folder is None and tarball.is_file():
        _safe_extract(tarball, root)
        folder = _find_cifar_folder(root)
    if folder is None:
        names = ", ".join((*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH))
        raise FileNotFoundError(
            f"cifar10: expected {names} in {root} or in {root / _CIFAR_SUBDIR}, or "
            f"{_CIFAR_TARBALL} in {root}. Fetch it with --download or "
            f"ffkern.data.download_dataset('cifar10', {str(root)!r})"
        )

    train = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN_BATCHES]
    test_data, test_labels = _read_cifar_batch(folder / _CIFAR_TEST_BATCH)
    x_train, y_train = _to_tensors(
        np.concatenate([data for data, _ in train]),
        np.concatenate([labels for _, labels in train]),
        device,
    )
    x_test, y_test = _to_tensors(test_data, test_labels, device)
    validate_arrays(x_train, y_train, _NUM_CLASSES["cifar10"], "cifar10 train")
    validate_arrays(x_test, y_test, _NUM_CLASSES["cifar10"], "cifar10 test")
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10, _CIFAR_IMAGE_SHAPE)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load one of :data:`DATASETS` as float32 ``[0, 1]`` feature rows on ``device``.

    ``name`` is case-insensitive and ``_`` may stand for ``-``. ``data_dir`` is the folder
    holding the dataset's files (ignored for ``digits``); without it, ``$FFKERN_DATA_DIR/<name>``
    or ``~/.cache/ffkern/<name>`` is used. With ``download=True``, missing files are fetched
    with :func:`download_dataset` first. Raises ``FileNotFoundError`` naming the expected files
    when they are missing, and ``ValueError`` when they are malformed.
    """
    key = _canonical_name(name)
    device = torch.device(device)
    if key == "digits":
        dataset = _load_digits(device)
    elif key == "cifar10":
        dataset = _load_cifar10(_resolve_dir(key, data_dir), download, device)
    else:
        dataset = _load_idx_dataset(key, _resolve_dir(key, data_dir), download, device)
    logger.info(
        "loaded %s: %d train / %d test images of shape %s, %d classes, on %s",
        dataset.name,
        dataset.x_train.shape[0],
        dataset.x_test.shape[0],
        dataset.image_shape,
        dataset.num_classes,
        dataset.device,
    )
    return dataset


# ------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: pathlib.Path, expected_md5: str) -> None:
    """Download ``url`` to ``target`` via a temporary file, keeping it only if the md5 matches."""
    logger.info("downloading %s to %s", url, target)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with (
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
            _atomic_output(target) as fh,
        ):
            while chunk := response.read(_CHUNK_BYTES):
                fh.write(chunk)
                digest.update(chunk)
            actual = digest.hexdigest()
            if actual != expected_md5.lower():
                # Raising inside the block deletes the temporary file.
                raise ValueError(
                    f"checksum mismatch for {url}: expected md5 {expected_md5}, got {actual}; "
                    f"the download was discarded"
                )
    except urllib.error.URLError as err:
        raise OSError(f"could not download {url}: {err.reason}") from err


def download_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
) -> pathlib.Path:
    """Fetch a dataset's standard files into ``data_dir`` and return that folder.

    Files already present with the right md5 are skipped; the others are downloaded from
    ``base_url`` (default: the dataset's usual mirror; ``file://`` URLs work too) into a
    temporary file, checked, then renamed into place. A checksum mismatch deletes the download
    and raises ``ValueError`` with both digests. ``checksums`` maps file names to md5 digests
    that replace the built-in ones (for mirrors of other files, and for tests).
    ``data_dir=None`` means the default folder described in :func:`load_dataset`. MNIST and
    Fashion-MNIST arrive as ``.gz`` IDX files, CIFAR-10 as ``cifar-10-python.tar.gz``, which
    ``load_dataset`` extracts. ``digits`` ships with scikit-learn and cannot be downloaded.
    """
    key = _canonical_name(name)
    if key not in _SOURCES:
        raise ValueError(
            f"dataset {key!r} is bundled with scikit-learn and has nothing to download; "
            f"downloadable datasets: {', '.join(_SOURCES)}"
        )
    source = _SOURCES[key]
    table = dict(source.files)
    overrides = dict(checksums or {})
    unknown = sorted(set(overrides) - set(table))
    if unknown:
        raise ValueError(
            f"checksums for {key}: unknown file names {unknown}; expected some of {sorted(table)}"
        )
    table.update(overrides)

    folder = _resolve_dir(key, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    url_root = base_url if base_url is not None else source.base_url
    if not url_root.endswith("/"):
        url_root += "/"
    for file_name, md5 in table.items():
        target = folder / file_name
        if target.is_file():
            if _md5(target) == md5.lower():
                logger.info("%s already present with the right checksum; skipping", target)
                continue
            logger.warning("%s exists but its checksum differs; downloading it again", target)
        _fetch(url_root + file_name, target, md5)
    return folder
