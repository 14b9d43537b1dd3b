"""Packages import downward only: no import cycle anywhere, and the processor never imports the emulator (what both
need of Shimmy is the leaf package `shimmy_spec`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("extproc", "settings", "gateway", "shimmy", "shimmy_spec", "bench")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module `name` (or `package.attribute`) lives in; None outside the project."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Project modules `path` imports: at module level (TYPE_CHECKING blocks included), or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not top_level_only else _top_level(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {m for a in node.names if (m := _resolve(a.name))}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {m for a in node.names if (m := _resolve(f"{node.module}.{a.name}"))}
    return found


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):  # `if TYPE_CHECKING:`, `try: import ... except ImportError:`
            out += _top_level(node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body])
    return out


def test_no_module_is_part_of_an_import_cycle() -> None:
    graph = {name: imports(path, top_level_only=True) - {name} for name, path in MODULES.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append([*trail[trail.index(name) :], name])
            return
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, cycles


def test_the_processor_never_imports_the_emulator_package() -> None:
    offenders = {
        name: sorted(m for m in imports(path, top_level_only=False) if m == "shimmy" or m.startswith("shimmy."))
        for name, path in MODULES.items()
        if name.split(".")[0] in ("extproc", "settings")
    }
    assert not {name: found for name, found in offenders.items() if found}


def _loaded_by(modules: list[str]) -> set[str]:
    probe = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(loaded.stdout.split())


def test_importing_the_processor_loads_no_emulator_module() -> None:
    modules = _loaded_by(sorted(name for name in MODULES if name.split(".")[0] == "extproc"))
    assert "shimmy_spec.versions" in modules  # the leaf package is what the processor knows of Shimmy
    assert not {m for m in modules if m == "shimmy" or m.startswith("shimmy.")}


def test_the_generation_path_loads_no_web_server() -> None:
    """The processor's gRPC side and its generation core need no HTTP server (only the Responses WebSocket mode,
    `extproc.responses_ws`, serves HTTP, and `extproc.cli` starts it)."""
    modules = _loaded_by(["extproc.server", "extproc.processors", "extproc.generation", "extproc.apis"])
    assert "aiohttp.web" not in modules
