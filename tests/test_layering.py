"""The house's import rules, enforced: who may import whom.

- every ``mvld.edge`` and ``mvld.common`` module imports with torch blocked (a Jetson node has
  no torch; ``common`` is the torch-free contract both sides share);
- ``mvld.common`` imports no other wing of the package;
- every ``mvld.receiver`` module imports with the training wing (``mvld.train``) blocked;
- no two modules import each other, directly or in a circle (module-level imports).
"""

import ast
import subprocess
import sys

from conftest import REPO_ROOT, STAGE_FOLDERS, source_modules

_BLOCKED_IMPORT = """
import importlib, importlib.abc, sys

BLOCKED = sys.argv[1].split(",")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
failed = []
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
assert not any(m.split(".")[0] in BLOCKED or m in BLOCKED for m in sys.modules)
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""

_LOADED_WINGS = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(sorted({".".join(m.split(".")[:2]) for m in sys.modules if m.startswith("mvld.")})))
"""


def _modules(package: str) -> list[str]:
    return [
        m
        for m in source_modules()
        if (m == package or m.startswith(package + ".")) and not m.endswith(".__main__")
    ]


def _import_blocked(blocked: str, modules: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORT, blocked, *modules], capture_output=True, text=True
    )


def test_edge_and_common_import_without_torch() -> None:
    modules = _modules("mvld.edge") + _modules("mvld.common")
    assert "mvld.edge.cli" in modules and "mvld.common.wire" in modules
    result = _import_blocked("torch,safetensors", modules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_common_imports_no_other_wing() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LOADED_WINGS, *_modules("mvld.common")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["mvld.common"]


def test_receiver_imports_no_training_code() -> None:
    result = _import_blocked("mvld.train", _modules("mvld.receiver"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_blocker_really_blocks() -> None:
    """Guard against a blocker that blocks nothing (the tests above would pass vacuously)."""
    for blocked, module in (("torch", "torch"), ("mvld.train", "mvld.train.cli")):
        result = _import_blocked(blocked, [module])
        assert result.returncode == 1
        assert "is blocked" in result.stdout


def _imports_of(module: str) -> set[str]:
    """Dotted names a module imports, at its top level or inside functions."""
    top = next(
        p
        for p in sorted(STAGE_FOLDERS, key=len, reverse=True)
        if module == p or module.startswith(p + ".")
    )
    relative = module[len(top) :].lstrip(".").replace(".", "/")
    folder = REPO_ROOT / STAGE_FOLDERS[top]
    path = folder / f"{relative}.py" if relative else folder / "__init__.py"
    if not path.is_file():
        path = folder / relative / "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circles() -> None:
    modules = set(source_modules())
    graph = {m: {n for n in _imports_of(m) if n in modules and n != m} for m in modules}
    # a package's __init__ importing nothing of its own does not create edges, so a package
    # and its submodules never form a circle by themselves
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
