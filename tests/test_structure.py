"""The package's shape: no import cycle, a pure core that never imports Ray (nor anything of
recall_ray outside the core), Ray only in the shell (recall_ray.cluster), and nothing in the
project that points to files outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

PKG = REPO / "recall_ray"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every recall_ray module `name` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule sub when there is one
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_recall_ray():
    g = graph()
    assert len(g) > 30 and "recall_ray.pipeline" in g  # the walk sees the package
    assert "recall_ray.cluster.merge" in g["recall_ray.pipeline"]  # and imports inside functions
    assert cycles(g) == []


def test_core_imports_only_the_core():
    g = graph()
    core = {m for m in g if m.startswith("recall_ray.core")}
    assert {"recall_ray.core.similarity", "recall_ray.core.merge_methods", "recall_ray.core.ewc"} <= core
    leaks = {m: sorted(d - core) for m in core if (d := g[m] - core)}
    assert leaks == {}


def test_only_the_shell_imports_ray():
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(m == "ray" or m.startswith("ray.") for m in mods):
                found.append(name)
    assert found and all(m.startswith("recall_ray.cluster") for m in found), sorted(set(found))


RAY_FREE = textwrap.dedent("""
    import importlib, pkgutil, sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"ray is unimportable in this test ({name})")

    sys.meta_path.insert(0, NoRay())
    import numpy as np
    import torch
    import recall_ray.core as core

    for m in pkgutil.walk_packages(core.__path__, "recall_ray.core."):
        importlib.import_module(m.name)
    assert not any(n == "ray" or n.startswith("ray.") for n in sys.modules), "ray was imported"

    # and the core works: per-layer weights and a merge of two tensors
    rng = np.random.default_rng(0)
    reps = [[rng.normal(size=(6, 4)) for _ in range(3)] for _ in range(2)]
    lw = core.layer_weights(reps, 2, sigma="median")
    assert np.allclose(lw.weight.sum(axis=1), 1.0)
    m = core.build_method("average", 1, 2, True, None)
    ts = [torch.zeros(3), torch.ones(3)]
    assert torch.equal(m.merge_tensor(lambda q: ts[q], 0, "w"), torch.full((3,), 0.5))
    print("RAY-FREE OK")
""")


def test_core_imports_and_runs_with_ray_unimportable():
    out = subprocess.run([sys.executable, "-c", RAY_FREE], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RAY-FREE OK" in out.stdout


def test_the_ray_blocker_works():
    """The ray-free test would pass vacuously if the blocker blocked nothing."""
    code = RAY_FREE.split("import numpy as np")[0] + "import ray\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ray is unimportable" in out.stderr


# the workspace's own notes beside the checkout, which a user does not have (written as a
# pattern, so this file does not name them itself)
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|shared/MODELS\.md|shared/PAPER\.md|shared/data")


def test_nothing_points_outside_the_repository():
    """A user has the repository only: code and docs name no file outside it (the project's
    own design notes are docs/design.md)."""
    suffixes = {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".txt", ".json", ".cfg"}
    bad = []
    for path in REPO.rglob("*"):
        if not path.is_file() or path.suffix not in suffixes or ".git" in path.parts or path == Path(__file__):
            continue
        if any(p in path.parts for p in ("runs", "node_modules", ".pytest_cache")):
            continue
        text = path.read_text(errors="replace")
        for hit in sorted(set(OUTSIDE.findall(text))):
            bad.append(f"{path.relative_to(REPO)}: {hit}")
    assert bad == []
    assert (REPO / "docs" / "design.md").is_file()
