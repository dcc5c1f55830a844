"""The dry run of scripts/gpu_check.sh: its plan checked on a machine without a GPU.

    printf '%s\\n' "${PLAN[@]}" | python scripts/gpu_check_plan.py --budget 540 --deadline 540 --log LOG

Reads the plan's lines (``name|cap|kind|arguments``, kinds ``cmd``, ``pytest``,
``sanitize-TOOL``, ``bench``) on stdin, prints each step with its cap, then checks: the
caps fit the budget; every test file a selection names exists and every selection
collects at least one test (``pytest --collect-only -m gpu``, all in this one process: a
torch import per selection would take minutes); every file with GPU-marked tests is in a
step; every benchmark script exists and its ``--help`` lists each option given.  Prints
``PROBLEM: ...`` for each failure and exits 1, else 0.  Run from the repository root.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

GPU_MARK = "pytest.mark.gpu"


class Step(NamedTuple):
    name: str
    cap: int
    kind: str
    args: list[str]


def parse(lines: list[str]) -> list[Step]:
    steps = []
    for line in lines:
        if line.strip():
            name, cap, kind, args = line.rstrip("\n").split("|", 3)
            steps.append(Step(name, int(cap), kind, shlex.split(args)))
    return steps


def is_selection(step: Step) -> bool:
    return step.kind == "pytest" or step.kind.startswith("sanitize-")


def collect(selection: list[str], log: io.TextIOBase) -> tuple[int, int]:
    """(pytest's exit code, tests collected) for ``selection`` with ``-m gpu``."""
    import pytest

    class Count:
        items = 0

        def pytest_collection_finish(self, session) -> None:
            Count.items = len(session.items)

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          *selection], plugins=[Count()])
    log.write(f"== {' '.join(selection)}\n{out.getvalue()}\n")
    return int(rc), Count.items


def help_text(script: str) -> tuple[int, str]:
    """(exit code, output) of ``python script --help``, run in this process."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # a script that fails to import: report, keep checking
        code, out = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    finally:
        sys.argv = argv
    return code, out.getvalue()


def gpu_test_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("*.py")
                  if GPU_MARK in p.read_text())


def check(steps: list[Step], budget: int, log: io.TextIOBase) -> list[str]:
    problems = []
    total = sum(s.cap for s in steps)
    if total > budget:
        problems.append(f"the caps add up to {total}s, over the {budget}s budget")
    named = {word.split("::")[0] for s in steps if is_selection(s) for word in s.args}
    problems += [f"{f} has GPU-marked tests but no step runs it"
                 for f in gpu_test_files(Path.cwd()) if f not in named]
    problems += [f"no such test file: {f}" for f in sorted(named) if not Path(f).exists()]
    for step in steps:
        if is_selection(step):
            rc, items = collect(step.args, log)
            if rc != 0 or items < 1:
                problems.append(f"{step.name}: pytest collects {items} test(s), exit {rc}: "
                                f"{' '.join(step.args)[:300]}")
            else:
                print(f"{step.name}: collects {items}")
        elif step.kind == "bench":
            script, *options = step.args
            if not Path(script).is_file():
                problems.append(f"{step.name}: no benchmark script {script}")
                continue
            code, text = help_text(script)
            if code != 0:
                problems.append(f"{step.name}: {script} --help failed: {text[-300:]}")
            problems += [f"{step.name}: {script} has no option {opt}"
                         for opt in options if opt.startswith("--") and opt not in text]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--deadline", type=int, required=True)
    ap.add_argument("--log", required=True, help="pytest's collection output goes here")
    args = ap.parse_args(argv)
    steps = parse(sys.stdin.readlines())
    print(f"{'step':<24} {'cap':>5}  what")
    for s in steps:
        print(f"{s.name:<24} {s.cap:>4}s  {s.kind}: {' '.join(s.args)}")
    print(f"caps: {sum(s.cap for s in steps)}s in all; budget {args.budget}s; "
          f"deadline {args.deadline}s")
    with open(args.log, "w") as log:
        problems = check(steps, args.budget, log)
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: the plan is sound" if not problems else
          f"dry run: {len(problems)} problem(s); pytest's output is in {args.log}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
