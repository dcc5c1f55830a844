"""Every public import path the README names works: each ``import`` / ``from ... import``
of ema_fused in its code blocks, every name in ``ema_fused.__all__``, and the module
paths listed under "Where things live", in a fresh interpreter (so that nothing a test
imported earlier hides a broken path)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from helpers.paths import ROOT

README = os.path.join(ROOT, "README.md")


def _readme_imports() -> list[str]:
    text = open(README).read()
    found = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        try:
            tree = ast.parse(block)
        except SyntaxError:  # a block of signatures, not a program: read it line by line
            nodes = []
            for line in block.splitlines():
                try:
                    nodes += ast.parse(line.strip()).body
                except SyntaxError:
                    pass
        else:
            nodes = list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import) and any(a.name.startswith("ema_fused")
                                                    for a in node.names):
                found.append(ast.unparse(node))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ema_fused"):
                found.append(ast.unparse(node))
    return sorted(set(found))


def _listed_modules() -> list[str]:
    section = open(README).read().split("## Where things live", 1)[1]
    paragraph = section.split("Public import paths:", 1)[1].split("\n\n", 1)[0]
    return sorted({m for m in re.findall(r"`(ema_fused(?:\.[a-z_]+)+)`", paragraph)
                   if not m.endswith("__all__")})


def test_readme_names_the_import_paths():
    imports, modules = _readme_imports(), _listed_modules()
    assert len(imports) >= 8, imports  # the README's examples import ema_fused throughout
    assert {"ema_fused.schedules", "ema_fused.migrate", "ema_fused.integrations.lightning",
            "ema_fused.integrations.transformers", "ema_fused.posthoc_solve"} <= set(modules)


def test_every_public_import_path_works_in_a_fresh_interpreter():
    lines = _readme_imports() + [f"import {m}" for m in _listed_modules()] + [
        "import ema_fused",
        "missing = [n for n in ema_fused.__all__ if not hasattr(ema_fused, n)]",
        "assert not missing, missing",
        "from ema_fused import *",
        "from ema_fused.posthoc_solve import solve_coefficients",
        "assert ema_fused.posthoc_solve is ema_fused.posthoc.solve",
        "print('OK', len(ema_fused.__all__))",
    ]
    # the integrations import their framework: lightning and transformers are test extras
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]
