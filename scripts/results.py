"""The results of record (docs/results/manifest.yaml): re-run them, publish them, regenerate and
check the tables the docs show, and verify them on your own machine.

    python scripts/results.py run fmnist-lowbit-budget          # into results/record/NAME
    python scripts/results.py run fmnist-lowbit-budget --resume # continue it (another session)
    python scripts/results.py run NAME --resume --published ../main  # a worktree continuing
    python scripts/results.py publish fmnist-lowbit-budget      # its records -> docs/results
    python scripts/results.py tables                            # rewrite the generated tables
    python scripts/results.py check                             # pages == records? (exit 1 if not)
    python scripts/results.py verify fmnist-lowbit-budget       # seed 0 of its decisive rows, here

``run`` trains seed by seed (every row of seed 0, then of seed 1, ...), so an interrupted
experiment holds whole seeds to compare; it refuses a checkout with uncommitted changes (a record
names the commit that made it) and a staging folder made at another commit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.runs import provenance, record_tables  # noqa: E402
from common.runs.launcher import has_runs  # noqa: E402
from common.runs.plan import preset_path, read_preset  # noqa: E402
from common.runs.records import (  # noqa: E402
    MANIFEST,
    SCORES,
    Experiment,
    ManifestError,
    Records,
    load_manifest,
    prediction_interval,
    read_records,
)

DEFAULT_STAGING = ROOT / "results" / "record"
VERIFY = ROOT / "results" / "verify"
# the pages whose generated blocks come from the records
PAGES = (ROOT / "README.md", ROOT / "docs" / "RESULTS.md")
# what a published run keeps: its records (models and per-run plots are re-made by re-running)
RECORD_FILES = ("config.json", "summary.json", "rounds.jsonl", "run_config.toml")


class ResultsError(RuntimeError):
    """A request that cannot be carried out; the message says why and what to do."""


def experiments(names: list[str]) -> list[Experiment]:
    """The manifest's experiments named (all of them for none); an unknown name is refused."""
    manifest = load_manifest(ROOT / MANIFEST)
    unknown = [name for name in names if name not in manifest]
    if unknown:
        raise ResultsError(f"unknown experiment(s) {unknown}: the manifest has {list(manifest)}")
    return [manifest[name] for name in names] if names else list(manifest.values())


def clean_head() -> str:
    """The checkout's commit, refused when tracked files have uncommitted changes."""
    commit, dirty = provenance.git_state(ROOT)
    if commit is None:
        raise ResultsError(f"{ROOT} is not a git checkout: a record must name its commit")
    if dirty:
        raise ResultsError(
            "the checkout has uncommitted changes, which its records could not name: commit "
            "them, or run from a worktree of a commit (git worktree add ../record HEAD)"
        )
    return commit


def staged(experiment: Experiment, staging: Path) -> Path:
    """Where ``run`` trains the experiment and ``publish`` takes it from."""
    return staging / experiment.name


def seed_order(experiment: Experiment) -> list[tuple[int, tuple[str, ...]]]:
    """(seed, rows) in the order ``run`` trains them: seed by seed, each seed's rows together."""
    seeds = sorted({seed for _, group in experiment.runs for seed in group})
    return [
        (seed, tuple(row for rows, group in experiment.runs if seed in group for row in rows))
        for seed in seeds
    ]


def rows_arguments(experiment: Experiment, rows: Sequence[str]) -> list[str]:
    """``simulation.py``'s arguments that run ``rows`` of the experiment's preset: ``--compare``
    for a comparison's rows, ``--sweep KEY=VALUES`` for a sweep's (its rows are the values)."""
    _, plan = read_preset(preset_path(experiment.preset, ROOT / "configs"))
    if "sweep" in plan:
        ((key, _),) = plan["sweep"].items()
        return ["--sweep", f"{key}={','.join(rows)}"]
    return ["--compare", ",".join(rows)]


def prepare_staging(
    experiment: Experiment, commit: str, resume: bool, staging: Path, published_in: Path
) -> Path:
    """The staging folder, checked: a new run refuses one that holds runs; ``--resume`` starts
    from the records of this commit published in the checkout ``published_in`` where no staging
    folder is left (a new session: a worktree of the records' commit lacks the seeds published
    after it, so it names the main checkout), and refuses records of another commit."""
    folder = staged(experiment, staging)
    started = has_runs(folder)
    if started and not resume:
        raise ResultsError(f"{folder} holds runs of {experiment.name}: continue with --resume")
    source = published_in / experiment.folder
    if resume and not started and source.is_dir():
        published = read_records(experiment, source)
        if published.summaries and published.commits == {commit}:
            copy_records(experiment, published, source, folder)
            print(f"==> resuming from the {len(published.summaries)} runs published in {source}")
    records = read_records(experiment, folder)
    others = records.commits - {commit}
    if others:
        raise ResultsError(
            f"{folder} holds runs made at {sorted(map(str, others))}, not at {commit[:12]}: "
            f"resume from a worktree of that commit, or move the folder away to start over"
        )
    return folder


def run_experiment(experiment: Experiment, resume: bool, staging: Path, published_in: Path) -> int:
    """Every run of ``experiment`` into its staging folder, seed by seed, with progress."""
    commit = clean_head()
    folder = prepare_staging(experiment, commit, resume, staging, published_in)
    total = experiment.run_count
    started = time.perf_counter()
    for seed, rows in seed_order(experiment):
        records = read_records(experiment, folder)
        done = len(records.summaries)
        todo = [row for row in rows if (row, seed) not in records.summaries]
        if not todo:
            continue
        walls = [s["wall-seconds"] for s in records.summaries.values()]
        left = (total - done) * sum(walls) / len(walls) / 60 if walls else None
        estimate = f", about {left:.0f} min left" if left is not None else ""
        print(
            f"\n==> {experiment.name}: seed {seed}, rows {', '.join(todo)} "
            f"({done}/{total} runs done{estimate})",
            flush=True,
        )
        command = [
            sys.executable,
            str(ROOT / "simulation.py"),
            experiment.preset,
            *rows_arguments(experiment, todo),
            "--seeds",
            str(seed),
            *(["--resume", str(folder)] if has_runs(folder) else ["--output-dir", str(folder)]),
        ]
        if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
            print(f"==> {experiment.name}: seed {seed} had a failed run", file=sys.stderr)
            return 1
    records = read_records(experiment, folder)
    print(
        f"\n==> {experiment.name}: {len(records.summaries)}/{total} runs in {folder} "
        f"({(time.perf_counter() - started) / 60:.0f} min); publish them with "
        f"`python scripts/results.py publish {experiment.name}`"
    )
    return 0


def copy_records(experiment: Experiment, records: Records, source: Path, target: Path) -> None:
    """Each recorded run's ``RECORD_FILES`` from ``source`` to ``target``."""
    for row, seed in records.summaries:
        origin = experiment.run_folder(source, row, seed)
        destination = experiment.run_folder(target, row, seed)
        destination.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            if (origin / name).exists():
                shutil.copy2(origin / name, destination / name)


def publish(experiment: Experiment, staging: Path) -> int:
    """Replace the experiment's published folder by its staged records, once they are checked
    (every one with provenance, one commit): built beside it, then swapped in."""
    folder = staged(experiment, staging)
    records = read_records(experiment, folder)
    if records.problems:
        raise ResultsError("not published:\n  " + "\n  ".join(records.problems))
    if not records.summaries:
        raise ResultsError(f"{folder} holds no finished run of {experiment.name}")
    target = ROOT / experiment.folder
    fresh = target.with_name(target.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    copy_records(experiment, records, folder, fresh)
    if read_records(experiment, fresh).summaries.keys() != records.summaries.keys():
        raise ResultsError(f"copying into {fresh} lost records: nothing published")
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    missing = records.missing
    print(
        f"==> published {len(records.summaries)} runs of {experiment.name} to {experiment.folder}"
        + (f"; {len(missing)} still to run (--resume)" if missing else "")
    )
    return 0


def published_records() -> dict[str, Records]:
    """Every experiment's published records, by name."""
    return {e.name: read_records(e, ROOT / e.folder) for e in experiments([])}


def write_tables() -> int:
    """Rewrite every generated block of the pages from the published records."""
    make = record_tables.renderers(published_records())
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = record_tables.rewrite(text, make)
        if new != text:
            page.write_text(new, encoding="utf-8")
            print(f"==> {page.relative_to(ROOT)}: generated blocks rewritten")
    return 0


def check() -> int:
    """0 when every generated block of the pages says what the records give and the records
    shown are sound; 1 with each difference named otherwise. Trains nothing."""
    all_records = published_records()
    make = record_tables.renderers(all_records)
    problems = [f"stale: {key}" for page in PAGES for key in record_tables.stale_blocks(page, make)]
    texts = [page.read_text(encoding="utf-8") for page in PAGES]
    shown = {key.split("/")[0] for text in texts for key, _ in record_tables.blocks(text)}
    if shown & {"answer", "headline"}:
        shown.add(record_tables.ANSWER_EXPERIMENT)
    for name in sorted(shown & set(all_records)):
        problems += all_records[name].problems
    for name, records in all_records.items():
        pending = len(records.missing)
        if pending:
            print(f"note: {name}: {pending} of {records.experiment.run_count} runs not published")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("results: run `python scripts/results.py tables` (or re-run the records)")
        return 1
    checked = sorted(shown & set(all_records))
    print(f"==> the pages' generated blocks match the records of {checked}")
    return 0


def verify(experiment: Experiment) -> int:
    """Seed 0 of the experiment's decisive rows on this machine, each number set beside the
    recorded seed 0 and the 95 % prediction interval of the recorded seeds."""
    recorded = read_records(experiment, ROOT / experiment.folder)
    if not recorded.summaries:
        raise ResultsError(f"{experiment.name} has no published records to verify against")
    folder = VERIFY / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [
        sys.executable,
        str(ROOT / "simulation.py"),
        experiment.preset,
        *rows_arguments(experiment, experiment.decisive),
        "--seeds",
        "0",
        "--output-dir",
        str(folder),
    ]
    if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
        return 1
    lines, outside = compared(experiment, read_records(experiment, folder), recorded)
    print("\n".join(lines))
    return 1 if outside else 0


def compared(experiment: Experiment, mine: Records, recorded: Records) -> tuple[list[str], int]:
    """Each decisive number of this machine's seed 0 beside the recorded seed 0 and the 95 %
    prediction interval of the recorded seeds; (lines, how many fell outside)."""
    sample = next(iter(recorded.summaries.values()))["provenance"]
    here = provenance.host_record()
    same = (
        provenance.git_state(ROOT)[0] == sample.get("commit")
        and here["versions"] == sample.get("versions")
        and here["cpu"]["isa"] == sample.get("cpu", {}).get("isa")
    )
    lines = [
        f"\n==> verify {experiment.name}: this machine "
        + ("matches" if same else "differs from")
        + " the records' commit, versions and vector extensions; the same digits are expected "
        "only where all three match, a number within the interval otherwise"
    ]
    outside = 0
    for row in experiment.decisive:
        for score, key in SCORES.items():
            value = mine.values(row, key).get(0)
            seeds = recorded.values(row, key)
            if value is None or not seeds:
                continue
            low, high = prediction_interval([100 * v for v in seeds.values()])
            inside = low <= 100 * value <= high
            outside += not inside
            was = seeds.get(0)
            lines.append(
                f"  {row} {score}: {100 * value:.2f} (recorded seed 0: "
                f"{'n/a' if was is None else f'{100 * was:.2f}'}; {len(seeds)} seeds' 95 % "
                f"prediction interval [{low:.2f}, {high:.2f}]: "
                f"{'within' if inside else 'OUTSIDE'})"
            )
    return lines, outside


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("action", choices=["run", "publish", "tables", "check", "verify"])
    parser.add_argument("names", nargs="*", help="experiments of the manifest (default: all)")
    parser.add_argument("--resume", action="store_true", help="run: continue the staging folder")
    parser.add_argument(
        "--staging",
        type=Path,
        default=DEFAULT_STAGING,
        help="run/publish: the folder of staged experiments (default: results/record), e.g. "
        "a worktree's, to publish what it ran into this checkout",
    )
    parser.add_argument(
        "--published",
        type=Path,
        default=ROOT,
        help="run --resume: the checkout whose published records a new staging folder starts "
        "from (default: this one); a worktree of the records' commit names the main checkout",
    )
    args = parser.parse_args()
    staging = args.staging.resolve()
    try:
        if args.action == "tables":
            return write_tables()
        if args.action == "check":
            return check()
        chosen = experiments(args.names)
        if args.action == "run":
            return max(
                run_experiment(e, args.resume, staging, args.published.resolve()) for e in chosen
            )
        if args.action == "verify":
            return max(verify(e) for e in chosen)
        return max(publish(e, staging) for e in chosen)
    except (ResultsError, ManifestError) as error:
        print(f"results: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
