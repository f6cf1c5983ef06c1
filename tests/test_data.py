"""Tests for ffkern.data: IDX reading and writing, the loaders, downloads and validation.

Everything runs offline on the CPU from small files each test writes into ``tmp_path``;
downloads use ``file://`` URLs pointing at such files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ffkern import data
from ffkern.data import (
    DATASETS,
    Dataset,
    download_dataset,
    export_idx,
    load_dataset,
    read_idx,
    validate_arrays,
    write_idx,
)

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def random_images(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """uint8 pixels in 1..255, so a zero-filled or unwritten buffer never passes."""
    return rng.integers(1, 256, size=shape, dtype=np.uint8)


def write_mnist_folder(
    folder: Path,
    rng: np.random.Generator,
    *,
    n_train: int = 7,
    n_test: int = 4,
    height: int = 5,
    width: int = 6,
    suffixes: tuple[str, str, str, str] = ("", "", "", ""),
) -> dict[str, np.ndarray]:
    """Write the four MNIST-named files (one suffix per file) and return their arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": random_images(rng, n_train, height, width),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": random_images(rng, n_test, height, width),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for (key, array), suffix in zip(arrays.items(), suffixes, strict=True):
        write_idx(folder / (IDX_NAMES[key] + suffix), array)
    return arrays


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """Build an IDX file by hand, independently of write_idx."""
    return bytes((0, 0, code, len(shape))) + struct.pack(f">{len(shape)}I", *shape) + payload


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def as_pixels(images: np.ndarray) -> torch.Tensor:
    """Reference conversion: uint8 images -> float32 rows divided by 255."""
    return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255)


# ------------------------------------------------------------------------------------------------
# IDX reading and writing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7, 5, 6), (7,), (1,), (3, 1, 2, 2)])
def test_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    array = random_images(rng, *shape)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)

    back = read_idx(path)
    assert back.dtype == np.uint8
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    assert sorted(os.listdir(tmp_path)) == [path.name], "temporary file left behind"


def test_idx_compression_detected_by_magic_not_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    array = random_images(rng, 7, 5, 6)
    write_idx(tmp_path / "packed.gz", array)
    write_idx(tmp_path / "plain", array)
    (tmp_path / "packed.gz").rename(tmp_path / "packed-without-suffix")
    (tmp_path / "plain").rename(tmp_path / "plain-with-suffix.gz")

    np.testing.assert_array_equal(read_idx(tmp_path / "packed-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-with-suffix.gz"), array)


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_read_idx_other_dtypes(tmp_path: Path, code: int, dtype: str) -> None:
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    path = tmp_path / "values"
    path.write_bytes(idx_bytes(code, values.shape, values.tobytes()))

    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back, values)

    write_idx(tmp_path / "again.gz", back)
    np.testing.assert_array_equal(read_idx(tmp_path / "again.gz"), values)


def test_write_idx_rejects_unsupported_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="int64 has no IDX code"):
        write_idx(tmp_path / "x", np.arange(6, dtype=np.int64))
    with pytest.raises(ValueError, match="got a 0-D array"):
        write_idx(tmp_path / "x", np.uint8(3))
    assert os.listdir(tmp_path) == []


GOOD = idx_bytes(0x08, (7, 5, 6), bytes(range(1, 211)))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (GOOD[:-1], "truncated payload.*needs 210 bytes after the header, got 209"),
        (GOOD + b"\x07", "oversized payload.*needs 210 bytes after the header, got 211"),
        (GOOD[:3], "truncated header, expected at least 4 bytes.*got 3"),
        (GOOD[:10], "truncated header, 3 dimensions need 16 bytes, got 10"),
        (b"\x01" + GOOD[1:], "wrong magic number.*got 0x01 0x00"),
        (GOOD[:2] + b"\x07" + GOOD[3:], "unknown dtype code 0x07"),
    ],
    ids=["truncated-payload", "oversized-payload", "short-magic", "short-dims", "magic", "dtype"],
)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_rejects_malformed(
    tmp_path: Path, content: bytes, pattern: str, compress: bool
) -> None:
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(ValueError, match=re.escape(path.name) + ".*" + pattern):
        read_idx(path)


@pytest.mark.parametrize("damage", ["crc", "truncated"])
def test_read_idx_rejects_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    packed = bytearray(gzip.compress(GOOD))
    if damage == "crc":
        packed[-8] ^= 0xFF  # the CRC-32 of the trailer
    else:
        del packed[len(packed) // 2 :]
    path = tmp_path / "broken.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=re.escape(path.name) + ".*corrupt gzip"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_failure_mid_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / f"images{suffix}"
    old = random_images(rng, 7, 5, 6)
    write_idx(path, old)
    old_bytes = path.read_bytes()

    def write_half_then_fail(fh, header, payload) -> None:
        fh.write(header)
        fh.write(payload.tobytes()[: payload.nbytes // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(data, "_write_idx_stream", write_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        write_idx(path, random_images(rng, 9, 5, 6))

    assert path.read_bytes() == old_bytes
    np.testing.assert_array_equal(read_idx(path), old)
    assert os.listdir(tmp_path) == [path.name], "temporary file left behind"


def test_write_idx_failure_at_rename_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_replace(src, dst) -> None:
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(data.os, "replace", fail_replace)
    with pytest.raises(OSError, match="simulated"):
        write_idx(tmp_path / "labels", np.arange(1, 8, dtype=np.uint8))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# MNIST-format folders
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffixes",
    [("", "", "", ""), (".gz", ".gz", ".gz", ".gz"), (".gz", "", "", ".gz")],
    ids=["plain", "gzip", "mixed"],
)
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_mnist_folder(tmp_path: Path, name: str, suffixes: tuple[str, ...]) -> None:
    arrays = write_mnist_folder(tmp_path, np.random.default_rng(5), suffixes=suffixes)
    ds = load_dataset(name, tmp_path)

    assert ds.name == name
    assert ds.image_shape == (1, 5, 6)
    assert ds.num_classes == 10
    assert ds.num_features == 30
    assert ds.x_train.shape == (7, 30) and ds.x_test.shape == (4, 30)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    torch.testing.assert_close(ds.x_train, as_pixels(arrays["train_images"]), rtol=0, atol=0)
    torch.testing.assert_close(ds.x_test, as_pixels(arrays["test_images"]), rtol=0, atol=0)
    assert torch.equal(ds.y_train, torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def test_load_mnist_prefers_plain_when_both_exist(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    arrays = write_mnist_folder(tmp_path, rng)
    write_mnist_folder(tmp_path, rng, suffixes=(".gz",) * 4)  # different random content
    ds = load_dataset("mnist", tmp_path)
    torch.testing.assert_close(ds.x_train, as_pixels(arrays["train_images"]), rtol=0, atol=0)


def test_load_mnist_missing_file(tmp_path: Path) -> None:
    write_mnist_folder(tmp_path, np.random.default_rng(7))
    (tmp_path / IDX_NAMES["test_labels"]).unlink()
    pattern = f"{re.escape(str(tmp_path))} lacks t10k-labels-idx1-ubyte.*--download"
    with pytest.raises(FileNotFoundError, match=pattern) as info:
        load_dataset("mnist", tmp_path)
    for file_name in IDX_NAMES.values():
        assert file_name in str(info.value)
    assert "download_dataset" in str(info.value)


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    write_mnist_folder(tmp_path, rng)
    write_idx(tmp_path / IDX_NAMES["train_labels"], rng.integers(0, 10, 6, dtype=np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte holds 7 images but "):
        load_dataset("mnist", tmp_path)


def test_load_mnist_wrong_ranks(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    write_mnist_folder(tmp_path, rng)
    write_idx(tmp_path / IDX_NAMES["train_images"], random_images(rng, 7, 30))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: expected 3-D data"):
        load_dataset("mnist", tmp_path)

    write_mnist_folder(tmp_path, rng)
    write_idx(tmp_path / IDX_NAMES["test_labels"], rng.integers(0, 10, (4, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: expected 1-D data"):
        load_dataset("mnist", tmp_path)


def test_load_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_mnist_folder(tmp_path, np.random.default_rng(10))
    write_idx(tmp_path / IDX_NAMES["test_labels"], np.array([3, 10, 1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mnist test: 1 labels .*\[0, 10\).*label 10 at index 1"):
        load_dataset("mnist", tmp_path)


def test_load_mnist_train_test_image_size_differ(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    write_mnist_folder(tmp_path, rng)
    write_idx(tmp_path / IDX_NAMES["test_images"], random_images(rng, 4, 6, 5))
    with pytest.raises(ValueError, match="train images are 5x6 but test images are 6x5"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------
# Bundled digits and export to IDX
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_split(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.image_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.x_train.shape == (1500, 64) and digits.x_test.shape == (297, 64)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    for x in (digits.x_train, digits.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    for y in (digits.y_train, digits.y_test):
        assert sorted(y.unique().tolist()) == list(range(10))

    # Stratified: each class's share of the test set is within one image of its overall share.
    counts_train = torch.bincount(digits.y_train, minlength=10)
    counts_test = torch.bincount(digits.y_test, minlength=10)
    expected_test = (counts_train + counts_test).double() * 297 / 1797
    assert torch.all((counts_test - expected_test).abs() <= 1)


def test_digits_split_is_deterministic(digits: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(12345)  # a user seed must not move the split
    again = load_dataset("DIGITS", tmp_path / "ignored")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(digits, field), getattr(again, field)), field
    assert not (tmp_path / "ignored").exists()


def test_export_idx_round_trip(digits: Dataset, tmp_path: Path) -> None:
    export_idx(digits, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(IDX_NAMES.values())
    again = load_dataset("mnist", tmp_path / "out")

    assert again.image_shape == digits.image_shape
    assert again.x_train.shape == digits.x_train.shape
    # round(255 * x) is off by at most half a quantisation step.
    torch.testing.assert_close(again.x_train, digits.x_train, rtol=0, atol=0.5 / 255 + 1e-7)
    torch.testing.assert_close(again.x_test, digits.x_test, rtol=0, atol=0.5 / 255 + 1e-7)
    assert torch.equal(again.y_train, digits.y_train)
    assert torch.equal(again.y_test, digits.y_test)


def test_export_idx_rejects_colour(tmp_path: Path) -> None:
    colour = Dataset(
        "colour",
        torch.rand(3, 12),
        torch.tensor([0, 1, 0]),
        torch.rand(2, 12),
        torch.tensor([1, 0]),
        2,
        (3, 2, 2),
    )
    with pytest.raises(ValueError, match=r"image shape \(3, 2, 2\), expected \(1, H, W\)"):
        export_idx(colour, tmp_path)


# ------------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------------


def write_cifar_batches(
    folder: Path, rng: np.random.Generator, per_batch: int = 4
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write tiny pickled batches in the official layout and return their contents."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in CIFAR_BATCHES:
        pixels = random_images(rng, per_batch, 3072)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": pixels, b"labels": labels}, fh)
        batches[name] = (pixels, labels)
    return batches


def check_cifar(ds: Dataset, batches: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    train_pixels = np.concatenate([batches[name][0] for name in CIFAR_BATCHES[:5]])
    train_labels = sum((batches[name][1] for name in CIFAR_BATCHES[:5]), [])
    assert ds.name == "cifar10" and ds.image_shape == (3, 32, 32) and ds.num_features == 3072
    assert ds.x_train.shape == (20, 3072) and ds.x_test.shape == (4, 3072)
    torch.testing.assert_close(ds.x_train, as_pixels(train_pixels), rtol=0, atol=0)
    torch.testing.assert_close(ds.x_test, as_pixels(batches["test_batch"][0]), rtol=0, atol=0)
    assert ds.y_train.tolist() == train_labels
    assert ds.y_test.tolist() == batches["test_batch"][1]


def make_tarball(path: Path, source: Path, arcname: str = "cifar-10-batches-py") -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=arcname)


@pytest.mark.parametrize("layout", ["direct", "subfolder"])
def test_cifar10_from_batches(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "direct" else tmp_path / "cifar-10-batches-py"
    batches = write_cifar_batches(folder, np.random.default_rng(12))
    check_cifar(load_dataset("cifar10", tmp_path), batches)


def test_cifar10_from_tarball(tmp_path: Path) -> None:
    batches = write_cifar_batches(tmp_path / "src", np.random.default_rng(13))
    root = tmp_path / "root"
    root.mkdir()
    make_tarball(root / "cifar-10-python.tar.gz", tmp_path / "src")

    check_cifar(load_dataset("cifar10", root), batches)
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    check_cifar(load_dataset("cifar10", root), batches)  # second call uses the extracted files


def tar_with_member(path: Path, member_name: str, kind: bytes = tarfile.REGTYPE) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member_name)
        info.type = kind
        payload = b"not a batch"
        if kind == tarfile.REGTYPE:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        else:
            info.linkname = "/etc/passwd"
            tar.addfile(info)


@pytest.mark.parametrize(
    ("member", "kind", "pattern"),
    [
        ("cifar-10-batches-py/../../escaped", tarfile.REGTYPE, "'..' path component"),
        ("/tmp/ffkern-absolute", tarfile.REGTYPE, "absolute path"),
        ("cifar-10-batches-py/link", tarfile.SYMTYPE, "link or special file"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_cifar10_tarball_unsafe_member_rejected(
    tmp_path: Path, member: str, kind: bytes, pattern: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    tar_with_member(root / "cifar-10-python.tar.gz", member, kind)
    with pytest.raises(ValueError, match="refusing to extract.*" + re.escape(pattern)):
        load_dataset("cifar10", root)
    assert os.listdir(root) == ["cifar-10-python.tar.gz"]
    assert not (tmp_path / "escaped").exists()


def test_cifar10_corrupt_tarball(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(ValueError, match="could not read archive .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_bad_batch_shape(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path, np.random.default_rng(14))
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.ones((4, 3071), np.uint8), b"labels": [0, 1, 2, 3]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3: expected b'data' .*\(n, 3072\)"):
        load_dataset("cifar10", tmp_path)

    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.ones((4, 3072), np.uint8), b"labels": [0, 1, 2]}, fh)
    with pytest.raises(ValueError, match="data_batch_3: expected 4 labels"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_missing(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path, np.random.default_rng(15))
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.*cifar-10-python.tar.gz.*--download"):
        load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------------------------------------
# Downloads over file:// URLs
# ------------------------------------------------------------------------------------------------


def mnist_mirror(folder: Path) -> tuple[str, dict[str, str], dict[str, np.ndarray]]:
    """A file:// mirror holding small .gz IDX files; returns (base URL, md5s, arrays)."""
    arrays = write_mnist_folder(folder, np.random.default_rng(16), suffixes=(".gz",) * 4)
    md5s = {f"{name}.gz": md5_of(folder / f"{name}.gz") for name in IDX_NAMES.values()}
    return folder.as_uri() + "/", md5s, arrays


def test_download_mnist_from_file_url(tmp_path: Path) -> None:
    base_url, md5s, arrays = mnist_mirror(tmp_path / "mirror")
    dest = tmp_path / "dest"
    assert download_dataset("mnist", dest, base_url=base_url, checksums=md5s) == dest
    assert sorted(os.listdir(dest)) == sorted(md5s)
    for file_name, md5 in md5s.items():
        assert md5_of(dest / file_name) == md5

    # Present with the right checksum: skipped, so the mirror is no longer needed.
    for file_name in md5s:
        (tmp_path / "mirror" / file_name).unlink()
    download_dataset("mnist", dest, base_url=base_url.rstrip("/"), checksums=md5s)

    ds = load_dataset("mnist", dest)
    torch.testing.assert_close(ds.x_train, as_pixels(arrays["train_images"]), rtol=0, atol=0)


def test_download_checksum_mismatch(tmp_path: Path) -> None:
    base_url, md5s, _ = mnist_mirror(tmp_path / "mirror")
    wrong = "0" * 32
    md5s["t10k-images-idx3-ubyte.gz"] = wrong
    actual = md5_of(tmp_path / "mirror" / "t10k-images-idx3-ubyte.gz")
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=f"expected md5 {wrong}, got {actual}"):
        download_dataset("mnist", dest, base_url=base_url, checksums=md5s)
    assert not (dest / "t10k-images-idx3-ubyte.gz").exists()
    assert not [name for name in os.listdir(dest) if name.endswith(".tmp")]


def test_download_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown file names"):
        download_dataset("mnist", tmp_path, checksums={"train-images.gz": "0" * 32})
    with pytest.raises(ValueError, match="nothing to download"):
        download_dataset("digits", tmp_path)
    with pytest.raises(OSError, match="could not download"):
        download_dataset("cifar10", tmp_path, base_url=(tmp_path / "absent").as_uri())


def test_load_dataset_download_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, md5s, arrays = mnist_mirror(tmp_path / "mirror")
    offline = functools.partial(download_dataset, base_url=base_url, checksums=md5s)
    monkeypatch.setattr(data, "download_dataset", offline)

    ds = load_dataset("mnist", tmp_path / "dest", download=True)
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def test_load_cifar10_download_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = write_cifar_batches(tmp_path / "src", np.random.default_rng(17))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_tarball(mirror / "cifar-10-python.tar.gz", tmp_path / "src")
    md5s = {"cifar-10-python.tar.gz": md5_of(mirror / "cifar-10-python.tar.gz")}
    offline = functools.partial(download_dataset, base_url=mirror.as_uri(), checksums=md5s)
    monkeypatch.setattr(data, "download_dataset", offline)

    check_cifar(load_dataset("cifar10", tmp_path / "dest", download=True), batches)


# ------------------------------------------------------------------------------------------------
# Validation and the Dataset container
# ------------------------------------------------------------------------------------------------


def test_validate_arrays_accepts_good_data() -> None:
    validate_arrays(torch.rand(5, 3), torch.tensor([0, 1, 2, 1, 0]), 3, "ok")


@pytest.mark.parametrize(
    ("x", "y", "pattern"),
    [
        (torch.rand(6), torch.zeros(6, dtype=torch.int64), r"x must be 2-D .*got shape \(6,\)"),
        (torch.rand(6, 2), torch.zeros(6, 1, dtype=torch.int64), "y must be 1-D"),
        (torch.rand(6, 2), torch.zeros(5, dtype=torch.int64), "x has 6 samples but y has 5"),
        (torch.rand(0, 2), torch.zeros(0, dtype=torch.int64), "holds no samples"),
        (torch.rand(6, 2), torch.zeros(6), "integer class labels, got dtype torch.float32"),
        (torch.rand(6, 2), torch.tensor([0, 1, 2, 3, 1, 0]), r"label 3 at index 3"),
        (torch.rand(6, 2), torch.tensor([0, 1, -1, 2, 1, 0]), r"range \[0, 3\).*label -1"),
    ],
    ids=["x-1d", "y-2d", "length", "empty", "float-labels", "label-high", "label-negative"],
)
def test_validate_arrays_rejects(x: torch.Tensor, y: torch.Tensor, pattern: str) -> None:
    with pytest.raises(ValueError, match="split-name: .*" + pattern):
        validate_arrays(x, y, 3, "split-name")


def test_validate_arrays_non_finite() -> None:
    x = torch.rand(4, 5) + 0.5
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, 4] = float("-inf")
    with pytest.raises(ValueError, match=r"3 NaN or Inf values \(1 NaN, 2 Inf\).*\(1, 3\)"):
        validate_arrays(x, torch.zeros(4, dtype=torch.int64), 10, "t")
    x[1, 3] = 0.25
    with pytest.raises(ValueError, match=r"2 NaN or Inf.*the first is inf at index \(2, 0\)"):
        validate_arrays(x, torch.zeros(4, dtype=torch.int64), 10, "t")


def test_dataset_container(digits: Dataset) -> None:
    moved = digits.to("cpu")
    assert moved.x_train is digits.x_train  # no copy when already there
    assert moved.num_features == 64
    assert repr(moved).startswith("Dataset(name='digits', train=1500, test=297")

    with pytest.raises(ValueError, match=r"image_shape \(1, 8, 7\) implies 56"):
        Dataset("bad", digits.x_train, digits.y_train, digits.x_test, digits.y_test, 10, (1, 8, 7))
    with pytest.raises(TypeError, match="x_train must be float32, got torch.float64"):
        Dataset(
            "bad",
            digits.x_train.double(),
            digits.y_train,
            digits.x_test,
            digits.y_test,
            10,
            (1, 8, 8),
        )


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; expected one of digits, mnist"):
        load_dataset("svhn", tmp_path)
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10")
