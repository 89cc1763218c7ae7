"""The shape of the code, checked so it cannot drift: where torch may be imported, no import
cycles, no private names across modules, modules and functions of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorasweep"
MAX_MODULE_LINES = 450  # "about 400"
MAX_FUNCTION_LINES = 80  # longer ones say why in a "# long: ..." comment


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported lorasweep module, imported name or "") for every import, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base.split(".")[0] == "lorasweep":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.append((sub, "") if sub in modules else (base, alias.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "lorasweep"]
    return out


def test_analysis_and_the_parent_side_import_without_torch():
    light = [m for m in _modules() if m.startswith("lorasweep.analysis")]
    light += ["lorasweep.records", "lorasweep.store", "lorasweep.spec", "lorasweep.plan",
              "lorasweep.cli", "lorasweep.cli_args", "lorasweep.run.rundir",
              "lorasweep.run.progress"]  # fmt: skip
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import importlib
for m in {light!r}:
    importlib.import_module(m)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_import_cycle_inside_lorasweep():
    modules = _modules()
    graph = {
        m: {t for t, _ in _imports(m, p, modules) if t in modules and t != m}
        for m, p in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = [
        f"{m} imports {name} from {base}"
        for m, p in modules.items()
        for base, name in _imports(m, p, modules)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, private


def test_modules_and_functions_are_of_a_readable_size():
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines()))
           > MAX_MODULE_LINES}  # fmt: skip
    assert not big, big
    long = []
    for m, p in _modules().items():
        text = p.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not any("# long:" in x for x in body):
                    long.append(f"{m}.{node.name}: {len(body)} lines")
    assert not long, long
