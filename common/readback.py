"""Checked readers for the files a run writes and the project reads back (JSON records, ``.npz``
archives): a damaged file is an error naming the file and what is wrong, never a traceback from
deep inside. Free of torch and Flower."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# what reading a damaged or foreign .npz (opened with allow_pickle=False) can raise; each reader
# turns these into its own error naming the file. zipfile raises RuntimeError for a member
# flagged encrypted and NotImplementedError (a RuntimeError) for a compression method, a
# version or a flag it does not know: one flipped header bit gives any of them.
NPZ_DAMAGE = (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, zipfile.BadZipFile)


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file and the problem."""


def read_json_object(path: Path, what: str = "record") -> dict[str, Any]:
    """The JSON object in ``path``: missing, not a file, not UTF-8, not JSON or not an object is
    a ``RecordError`` naming ``path`` and ``what`` it should be."""
    if not path.exists():
        raise RecordError(f"{path}: no such {what}")
    if not path.is_file():
        raise RecordError(f"{path}: a {what} must be a file, this is a folder or device")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise RecordError(f"{path}: not UTF-8 text ({error.reason}), not a {what}") from None
    except json.JSONDecodeError as error:
        raise RecordError(
            f"{path}: not JSON ({error.msg} at line {error.lineno}), a damaged {what}"
        ) from None
    except OSError as error:
        raise RecordError(f"{path}: cannot be read ({error.strerror})") from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: holds a JSON {type(value).__name__}, a {what} is an object")
    return value


def npz_array(archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    """Member ``key`` of an archive, which must be a ``.npy`` array: a member that is not one
    reads back as raw bytes, a ``ValueError`` here (a missing one is numpy's ``KeyError``)."""
    value = archive[key]
    if not isinstance(value, np.ndarray):
        raise ValueError(f"its member {key!r} is not a .npy array")
    return value
