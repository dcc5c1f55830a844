"""The package's layout as README.md ("Where things live") describes it, read from the
source with ``ast`` (nothing is imported): the top level holds only the faces and the
named modules, every import runs down the layers, no import circle, and the layers
above reach ``ema/``, ``posthoc/``, ``averaging/`` and ``checks/`` only through the
names their ``__init__.py`` exports."""
from __future__ import annotations

import ast
import os
from typing import Iterator

from helpers.paths import ROOT

PACKAGE = os.path.join(ROOT, "ema_fused")
KERNELS = os.path.join(ROOT, "triton_kernels")  # installed as ema_fused.triton_kernels

#: each unit (a top-level module or a subpackage) and its layer, lowest first: a unit may
#: import only units of a lower layer (or itself)
LAYERS = {
    "checks": 0,
    "triton_kernels": 1,
    "backends": 2,
    "ops": 3,
    "distributed": 4, "schedules": 4,
    "ema": 5,
    "averaging": 6, "migrate": 6,
    "posthoc": 7,  # a synthesis is a weighted sum of snapshots: averaging's streamed one
    "integrations": 8, "compat": 8,
    "__init__": 9, "__main__": 10, "demo": 10,
}
TOP_LEVEL_MODULES = {"__init__", "__main__", "demo", "distributed", "schedules", "migrate", "ops"}
SUBPACKAGES = {"checks", "backends", "ema", "posthoc", "averaging", "integrations", "compat"}
#: subpackages that the units above reach only through their __init__'s __all__
FACED = ("checks", "ema", "posthoc", "averaging")


def _modules() -> Iterator[tuple[str, str]]:
    """(dotted module name, path) of every .py file of the installed package."""
    for base, prefix in ((PACKAGE, "ema_fused"), (KERNELS, "ema_fused.triton_kernels")):
        for folder, _, files in os.walk(base):
            rel = os.path.relpath(folder, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in sorted(files):
                if f.endswith(".py"):
                    mod = [prefix, *parts] + ([] if f == "__init__.py" else [f[:-3]])
                    yield ".".join(mod), os.path.join(folder, f)


MODULES = dict(_modules())


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, "").endswith("__init__.py")


def _imports(mod: str) -> Iterator[tuple[str, str, int, str]]:
    """(imported module, imported name or "", line, the module written after ``from``) for
    every import in ``mod``'s file, at any depth (imports inside functions count: a lazy
    import is still an edge)."""
    tree = ast.parse(open(MODULES[mod]).read())
    package = mod if _is_package(mod) else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ema_fused"):
                    yield alias.name, "", node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("ema_fused"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES or sub == "ema_fused._C":  # _C: the compiled extension
                    yield sub, "", node.lineno, source  # ``from pkg import module``
                else:
                    yield source, alias.name, node.lineno, source


def _unit(mod: str) -> str:
    parts = mod.split(".")
    if parts[1:2] == ["triton_kernels"]:
        return "triton_kernels"
    return parts[1] if len(parts) > 1 else "__init__"


def test_top_level_holds_only_the_faces_and_the_named_modules():
    entries = os.listdir(PACKAGE)
    modules = {e[:-3] for e in entries if e.endswith(".py")}
    packages = {e for e in entries if os.path.isfile(os.path.join(PACKAGE, e, "__init__.py"))}
    assert modules == TOP_LEVEL_MODULES, sorted(modules ^ TOP_LEVEL_MODULES)
    assert packages == SUBPACKAGES, sorted(packages ^ SUBPACKAGES)
    assert set(LAYERS) >= modules | packages | {"triton_kernels"}


def test_every_import_runs_down_the_layers():
    upward = []
    for mod in MODULES:
        for target, _, line, _ in _imports(mod):
            if target == "ema_fused" and _unit(mod) not in ("__main__", "demo"):
                upward.append(f"{mod}:{line} imports the package face")
                continue
            if target == "ema_fused" or target.startswith("ema_fused._C"):
                continue
            a, b = _unit(mod), _unit(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                upward.append(f"{mod}:{line} ({a}, layer {LAYERS[a]}) imports {target} "
                              f"({b}, layer {LAYERS[b]})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {m: {t for t, _, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own submodules is how a face works; a submodule
    # importing a sibling through that face is what makes a circle
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt])
                               if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "\n".join(circles)


def _exported(package: str) -> set[str]:
    tree = ast.parse(open(MODULES[package]).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{package} has no __all__")


def test_faced_subpackages_are_reached_only_through_their_exports():
    wrong = []
    for mod in MODULES:
        for target, name, line, source in _imports(mod):
            for sub in FACED:
                face = f"ema_fused.{sub}"
                if _unit(mod) == sub or not (target == face or target.startswith(face + ".")):
                    continue
                what = name or target.rsplit(".", 1)[1]  # a name, or a module of the face
                if source == face and what in _exported(face):
                    continue
                wrong.append(f"{mod}:{line} imports {what} from {source}: not through "
                             f"{face}'s exports")
    assert not wrong, "\n".join(wrong)
