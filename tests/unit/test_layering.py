"""The folders are the actors, around a shared core, and the imports keep them apart.

- the shared core (kjumpd/*.py, kjumpd/image/, kjumpd/linux/) imports only itself;
- B, the save kernel's agent (kjumpd/agent/), and R, the restore-first environment
  (kjumpd/restore/), import only the core, themselves, the standard library, lz4 and
  cryptography (for encrypted images only): they run in small initramfs archives with
  nothing else in them. R may also import B: confined to the jump area, R is the save
  kernel in the restore role and runs B's restore itself (kjumpd.confine);
- A, the daemon (kjumpd/daemon/) and its command-line client (kjumpd/cli/), may use the core;
  nothing below them imports the daemon.

Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "kjumpd"
ACTORS = {"daemon": "A", "cli": "A", "agent": "B", "restore": "R"}
#: the package's entry point (python -m kjumpd) starts the daemon
ENTRY = {"kjumpd.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(mod: str) -> str:
    parts = mod.split(".")
    return ACTORS.get(parts[1], "core") if len(parts) > 1 else "core"


def imports(path: Path) -> list[str]:
    """Every module this file imports (``from kjumpd import x`` counts as kjumpd.x)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kjumpd" or node.module in (
                "kjumpd.image",
                "kjumpd.linux",
                "kjumpd.daemon",
                "kjumpd.agent",
                "kjumpd.restore",
                "kjumpd.cli",
            ):
                out += [f"{node.module}.{a.name}" for a in node.names]
            else:
                out.append(node.module)
    return out


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def test_every_actor_has_its_folder():
    assert {layer(m) for m in MODULES} == {"core", "A", "B", "R"}
    for name in ("errors", "sysroot", "job", "cpio", "image.format", "linux.cmdline"):
        assert layer(f"kjumpd.{name}") == "core"


@pytest.mark.parametrize("mod", sorted(set(MODULES) - ENTRY))
def test_imports_stay_inside_the_layers(mod):
    mine = layer(mod)
    allowed = {"core"} | {mine} | ({"B"} if mine == "R" else set())
    wrong = []
    for imp in imports(MODULES[mod]):
        top = imp.split(".")[0]
        if top == "kjumpd":
            if layer(imp) not in allowed:
                wrong.append(f"{imp} ({layer(imp)})")
        elif (
            mine in ("core", "B", "R")
            and top not in sys.stdlib_module_names
            and top
            not in (
                "lz4",
                "cryptography",
            )
        ):
            wrong.append(f"{imp} (third-party)")
    assert not wrong, f"{mod} ({mine}) imports {', '.join(wrong)}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kjumpd.daemon import transaction\n    import pydbus\n")
    assert imports(bad) == ["kjumpd.daemon.transaction", "pydbus"]
    assert layer("kjumpd.daemon.transaction") == "A" and layer("kjumpd.agent.devmem") == "B"
