"""What can drift in the docs, checked mechanically: page sizes, no commit hash in the README,
every preset and path a page names exists, and algorithm lists come from ``ALGORITHMS``."""

import re
from pathlib import Path

import pytest

from common.algorithms import ALGORITHM_NAMES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CHANGELOG.md"]
TOP = ("common", "fedqssl_client", "fedqssl_server", "scripts", "docs", "tests", "benchmarks",
       "configs", "docker")  # fmt: skip
WRITTEN = ("benchmarks/results/", "docs/results/", "docker/volumes/")


def test_the_readme_is_short_and_every_page_is_one_task_long():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000
    for page in (ROOT / "docs").glob("*.md"):
        assert len(page.read_bytes()) <= 30_000, page.name


def test_the_readme_names_no_commit():
    text = (ROOT / "README.md").read_text()
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h)]
    assert not [h for h in hashes if re.search(r"\d", h)], hashes


def test_the_readme_links_the_quick_start_results_and_deployment_within_a_screen():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    for needed in ("## Results at a glance", "## Quick start"):
        assert needed in head
    assert "docs/deployment.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_preset_a_page_names_exists(page):
    text = page.read_text()
    for name in re.findall(r"configs/([\w.-]+)\.yaml", text):
        assert (ROOT / "configs" / f"{name}.yaml").exists(), (page.name, name)
    for name in re.findall(r"simulation\.py (?:configs/)?([a-z][\w-]+)(?:\.yaml)?\b", text):
        if name not in ("PRESET",):
            assert (ROOT / "configs" / f"{name}.yaml").exists(), (page.name, name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page):
    """A backticked repository path (``common/...``, ``scripts/...``) must exist; placeholders
    (``<s>``, ``PRESET``, ``...``, globs) are not paths."""
    for token in re.findall(r"`([^`\s]+)`", page.read_text()):
        path = token.split(":")[0].rstrip(".,")
        if not path.startswith(tuple(f"{top}/" for top in TOP)):
            continue
        if re.search(r"[<>*]|\.\.\.|[A-Z]{3,}", path):
            continue
        if path.startswith(WRITTEN):  # where a command writes: there once it has run
            continue
        assert (ROOT / path).exists(), (page.name, path)


def test_the_algorithms_a_page_lists_are_the_known_ones():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert ", ".join(ALGORITHM_NAMES) in text
    experiments = (ROOT / "docs" / "experiments.md").read_text()
    for name in ALGORITHM_NAMES:
        assert f"| `{name}` |" in experiments, name
