"""Checked readers for the JSON records a run writes and the project reads back: a damaged file
is a ``RecordError`` naming the file and what is wrong, never a traceback from deep inside.
Free of torch and Flower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
