"""Rewrite the benchmark tables of docs/BENCHMARKS.md and the README from the JSON results.

Each ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->`` block is replaced by the table, the
headlines and a provenance line (command, date, commit, machine) of
``benchmarks/results/NAME.json`` (written by ``harness.write_result``); a
``<!-- headlines:NAME -->`` block by the headlines and the provenance only (the README's
summary). The prose around the blocks is left alone. ``--check`` exits 1 when a document differs
from what the files say.

    python benchmarks/tables.py            # rewrite docs/BENCHMARKS.md and README.md
    python benchmarks/tables.py --check    # are they up to date?
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from harness import RESULTS, ROOT, headline_text, markdown_table

DOCUMENTS = [ROOT / "docs" / "BENCHMARKS.md", ROOT / "README.md"]
BLOCK = re.compile(r"(<!-- (table|headlines):([\w-]+) -->\n)(.*?)(<!-- /\2:\3 -->)", re.DOTALL)


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


def rendered(kind: str, name: str) -> str:
    """The block's body for ``NAME``: table (for a table block), headlines, provenance."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"a {kind} block names {name!r} but {path} does not exist")
    result = json.loads(path.read_text())
    if "table" not in result:
        raise SystemExit(f"{path} was not written by benchmarks/harness.py: re-run its benchmark")
    lines = [markdown_table(result), ""] if kind == "table" else []
    lines += [headline_text(finding) for finding in result["headlines"]]
    lines += ["", provenance(result)]
    return "\n".join(lines) + "\n"


def updated(text: str) -> str:
    """``text`` with every block rebuilt from its result file."""
    return BLOCK.sub(lambda m: m.group(1) + rendered(m.group(2), m.group(3)) + m.group(5), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether they are up to date")
    args = parser.parse_args()
    stale = []
    for document in DOCUMENTS:
        text = document.read_text()
        new = updated(text)
        names = [m.group(3) for m in BLOCK.finditer(text)]
        if args.check:
            if new != text:
                stale.append(document.name)
            continue
        document.write_text(new)
        print(f"rewrote {len(names)} blocks in {document.name}: {', '.join(names)}")
    if stale:
        print(f"{', '.join(stale)} differ from benchmarks/results: run python benchmarks/tables.py")
        sys.exit(1)
    if args.check:
        print("every benchmark block is up to date")


if __name__ == "__main__":
    main()
