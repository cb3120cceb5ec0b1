"""Atomic writes (common.atomic): a file is the old one or the new one, never half of one."""

import numpy as np
import pytest

from common.atomic import write_atomically, write_npz_atomically, write_text_atomically


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomically(path, "old\n")

    def half_then_crash(file):
        file.write(b"half of the new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomically(path, half_then_crash)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    write_text_atomically(path, "new ü\n")
    assert path.read_text(encoding="utf-8") == "new ü\n"


def test_npz_and_text_share_the_mechanism(tmp_path):
    write_npz_atomically(tmp_path / "deep" / "arrays.npz", {"a": np.arange(3)})
    assert np.array_equal(np.load(tmp_path / "deep" / "arrays.npz")["a"], np.arange(3))
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["arrays.npz"]
