"""docs/configuration.md's table of every config key, generated from ``ExperimentConfig``'s
fields (default, allowed values, what each sets), so the page cannot drift from the code.

    python -m common.config_reference          # rewrite the page's generated table
    python -m common.config_reference --check  # exit 1 when the page differs
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from common.config import ExperimentConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- generated: config-keys -->\n", "<!-- /generated -->"


def key_table() -> str:
    """One row per key, in the dataclass's order: key, default (as the Flower run config
    writes it), allowed values where they are a closed set, and what it sets."""
    defaults = ExperimentConfig().to_run_config()
    lines = ["| key | default | allowed | what it sets |", "|---|---|---|---|"]
    for field in dataclasses.fields(ExperimentConfig):
        key = field.name.replace("_", "-")
        default = defaults[key]
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        allowed = ", ".join(field.metadata.get("allowed", ())) or ""
        lines.append(f"| `{key}` | `{shown}` | {allowed} | {field.metadata['doc']} |")
    return "\n".join(lines) + "\n"


def rewritten(text: str) -> str:
    """``text`` with its generated block holding ``key_table()``."""
    head, found, rest = text.partition(START)
    if not found or END not in rest:
        raise ValueError(f"{PAGE}: no {START.strip()} ... {END} block")
    return head + START + key_table() + rest[rest.index(END) :]


def main(argv: list[str]) -> int:
    text = PAGE.read_text(encoding="utf-8")
    new = rewritten(text)
    if "--check" in argv:
        if new != text:
            print(
                f"{PAGE}: the key table differs from ExperimentConfig: run "
                "`python -m common.config_reference`",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
