"""Rewrite docs/BENCHMARKS.md's tables from the benchmarks' JSON results.

Each ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->`` block is replaced by the table, the
headlines and a provenance line (command, date, commit, machine) of
``benchmarks/results/NAME.json`` (written by ``harness.write_result``); the prose around the
blocks is left alone. ``--check`` exits 1 when the document differs from what the files say.

    python benchmarks/tables.py            # rewrite docs/BENCHMARKS.md
    python benchmarks/tables.py --check    # is the document up to date?
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from harness import RESULTS, ROOT, headline_text, markdown_table

DOCUMENT = ROOT / "docs" / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.DOTALL)


def provenance(result: dict) -> str:
    """Where and how the numbers were measured, in one line."""
    machine = result["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}"
    if machine.get("gpu"):
        where += f", {machine['gpu']}"
    load = machine.get("load_average_1min")
    if load is not None:
        where += f", load {load:.1f} at start"
    return (
        f"*`{result['command']}`, {result['date']}, commit {result.get('commit') or '?'}; "
        f"{where} (`benchmarks/results/{result['benchmark']}.json`).*"
    )


def rendered(name: str) -> str:
    """The block's body for ``NAME``: table, headlines, provenance."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{DOCUMENT.name} has a table for {name!r} but {path} does not exist")
    result = json.loads(path.read_text())
    if "table" not in result:
        raise SystemExit(f"{path} was not written by benchmarks/harness.py: re-run its benchmark")
    lines = [markdown_table(result), ""]
    lines += [headline_text(finding) for finding in result["headlines"]]
    lines += ["", provenance(result)]
    return "\n".join(lines) + "\n"


def updated(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + rendered(m.group(2)) + m.group(4), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is up to date")
    args = parser.parse_args()
    text = DOCUMENT.read_text()
    new = updated(text)
    names = [m.group(2) for m in BLOCK.finditer(text)]
    if args.check:
        if new != text:
            print(f"{DOCUMENT} differs from benchmarks/results: run python benchmarks/tables.py")
            sys.exit(1)
        print(f"{DOCUMENT}: {len(names)} tables up to date")
        return
    DOCUMENT.write_text(new)
    print(f"rewrote {len(names)} tables in {DOCUMENT}: {', '.join(names)}")


if __name__ == "__main__":
    main()
