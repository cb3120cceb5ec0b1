"""What the tests' runs tell about the SuperLinks they ran on, and a check that one is gone."""

import re
from pathlib import Path

ANNOUNCED = re.compile(r"==> SuperLink pid (\d+) on (\S+), Flower home (.+)")


def announced_superlink(output: str) -> tuple[int, str, Path]:
    """(pid, address, Flower home) of the SuperLink that ``simulation.py``'s output says it
    started."""
    found = ANNOUNCED.search(output)
    assert found, output[-3000:]
    return int(found.group(1)), found.group(2), Path(found.group(3).strip())


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def superlinks_mentioning(text: str) -> set[int]:
    """The ``flower-superlink`` processes whose command line holds ``text`` (a test's own temp
    folder: Flower's ``flwr run`` starts its SuperLink detached and says no pid)."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            arguments = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in arguments and text in arguments:
            found.add(int(proc.name))
    return found
