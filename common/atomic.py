"""Files written so that a process killed at any moment leaves the old file or the new one,
never half of one (NumPy only: the checkpoint reader uses it without torch)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)``: temp file beside it, fsync, rename, fsync the
    folder; a failure leaves the old file and no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix
    )
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as an ``.npz``, atomically (``write_atomically``)."""
    write_atomically(path, lambda file: np.savez(file, **arrays))


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically (``write_atomically``)."""
    write_atomically(path, lambda file: file.write(text.encode()))


def claim_new_folder(stem: Path) -> Path:
    """Create and return ``stem``, or ``stem-2``, ``stem-3``, ... : the first that did not exist,
    so two runs started in the same second never share a default folder."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = stem, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = stem.with_name(f"{stem.name}-{number}")
