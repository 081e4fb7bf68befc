"""The house rules docs/architecture.md states, checked on the source: imports point one way
(serve_app -> cluster -> tuning -> trainers; inside cluster, leaves < protocol < state <
planning < jobs < control/console), no module over 400 lines, and only settings reads the
environment in cluster/ and serve_app/."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("serve_app", "cluster", "tuning", "trainers")
# lower rank = lower layer; a module may import its own layer or lower ones only
RANK = {"trainers": 0, "tuning": 1, "cluster.plan": 2, "cluster.settings": 2, "cluster.protocol": 3,
        "cluster.state": 4, "cluster.planning": 5, "cluster.jobs": 6, "cluster.control": 7, "cluster.console": 7,
        "cluster": 7, "serve_app": 8}
# G.O.D's validator runs `python -m trainers.tournament`: that entry point hands over to cluster/
ALLOWED_UPWARD = {("trainers.tournament", "cluster.jobs.tournament")}


def layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return None


def modules():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            yield ".".join(rel.parts).removesuffix(".__init__"), path


def imported(tree: ast.AST, name: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[:-node.level]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


def test_imports_point_down_the_layers():
    upward = []
    for name, path in modules():
        here = layer(name)
        for target in imported(ast.parse(path.read_text()), name):
            there = layer(target)
            if there and RANK[there] > RANK[here] and (name, target) not in ALLOWED_UPWARD:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_no_module_over_400_lines():
    long = [f"{name}: {n}" for name, path in modules() if (n := len(path.read_text().splitlines())) > 400]
    assert not long, long


def test_only_settings_reads_the_environment_in_the_control_plane():
    readers = []
    for name, path in modules():
        if name.startswith(("cluster", "serve_app")) and name != "cluster.settings":
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                # os.environ[...] / os.environ.get(...) / os.getenv(...) read; writes for child processes are allowed
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                        isinstance(node.value, ast.Name) and node.value.id == "os":
                    readers.append(f"{name}:{node.lineno}")
    writes = {r for r in readers if r.split(":")[0] in ("cluster.console.cli", "cluster.console.embedded")}
    assert set(readers) <= writes, sorted(set(readers) - writes)
