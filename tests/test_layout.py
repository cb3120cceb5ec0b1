"""The house's floors hold: ``common/``'s wings import only the floors below them, the core never
imports Flower or the Flower apps, and nothing forms a circle (read from the import statements of
every module, so a new upward import fails here, not in a review)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a wing may import its own modules and those of the floors listed for it
FLOORS = {
    "bottom": set(),
    "lowbit": {"bottom"},
    "data": {"bottom"},
    "wire": {"bottom", "lowbit"},
    "learning": {"bottom", "lowbit", "data"},
    "runs": {"bottom", "lowbit", "data", "wire", "learning"},
}
WINGS = set(FLOORS) - {"bottom"}


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else "bottom"


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from common import X`` counts as ``common.X``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("common", *(f"common.{w}" for w in WINGS)):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def common_modules() -> dict[str, set[str]]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): imports_of(path)
        for path in (ROOT / "common").rglob("*.py")
        if path.name != "__init__.py"
    }


def test_every_wing_imports_only_the_floors_below_it():
    upward = [
        f"{module} imports {target}"
        for module, targets in common_modules().items()
        for target in targets
        if target.startswith("common.")
        and wing_of(target) != wing_of(module)
        and wing_of(target) not in FLOORS[wing_of(module)]
    ]
    assert upward == []


def test_the_core_imports_neither_flower_nor_the_apps():
    outward = [
        f"{module} imports {target}"
        for module, targets in common_modules().items()
        for target in targets
        if target.split(".")[0] in ("flwr", "fedqssl_server", "fedqssl_client", "ray")
    ]
    assert outward == []


def test_no_module_of_common_takes_part_in_a_circle():
    modules = common_modules()
    graph = {module: targets & set(modules) for module, targets in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path, module, target]
            if target not in state and (circle := visit(target, [*path, module])):
                return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, []) is None


def test_no_python_file_holds_c_plus_plus_source():
    """The kernels' C++ lives in ``.cpp`` files that editors, formatters and linters read."""
    holders = [
        path.relative_to(ROOT)
        for path in ROOT.glob("*/**/*.py")
        if ".venv" not in path.parts and "\n#include <" in path.read_text(encoding="utf-8")
    ]
    assert holders == [] and (ROOT / "common/lowbit/csrc/fused.cpp").is_file()
