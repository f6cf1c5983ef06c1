"""Checkpoints and metrics logs, written so that a crash never destroys what was there.

A checkpoint is written to a temporary file in the destination's folder, flushed to disk, then
renamed over the destination (``os.replace`` is atomic on POSIX and Windows); the folder entry
is synced too. A reader therefore sees either the previous checkpoint or the new one, whole.
Metrics are one JSON object a line, each line written with a single ``write`` and flushed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "ffkern-checkpoint"
VERSION = 1


def atomic_write_bytes(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(fileobj)`` on a temporary file, then rename it to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain Python values) as an ffkern checkpoint."""
    data = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write_bytes(path, lambda f: torch.save(data, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable ffkern checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ffkern checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {data.get('version')}, "
            f"this ffkern reads version {VERSION}"
        )
    return data


class MetricsLog:
    """Appends one JSON object a line; each line is flushed and synced as it is written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log; a torn last line (from a crash) is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records
