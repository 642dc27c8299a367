"""Mutation testing of the modules that decide (memory accounting, scheduling, sampling).

Each mutant is one small deliberate bug (a comparison off by one, + for -, a constant plus one,
`and` for `or`, min for max, a call dropped, ...) in one module; the fast tests that cover that
module run against it. A mutant the tests fail on is killed; one they pass is a blind spot (or an
equivalent program: the report says which). A small driver of our own rather than mutmut: it runs
on a private copy of the committed tree, so the code others are editing is never touched, and
the tests are the project's own pytest files, unchanged.

    nice -n 19 python bench/mutation.py                     # every module, 40 sampled each
    python bench/mutation.py --modules past_future --per-module 0   # 0 = every mutant of the module
    python bench/mutation.py --mutants scheduler:17,kv_pool:3        # rerun chosen mutants
    python bench/mutation.py --per-module 0 --skip-done bench/records/mutation-2026-12-02.jsonl  # the rest

Mutant ids are `module:index` in the order the sites appear in the source, so an id names the same
mutant as long as the module is unchanged. Records go to bench/records/mutation-<date>.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module -> (source file, the fast tests that cover it). Engine-level tests (a model per test) are
# left out: minutes per mutant. The model-free scheduler tests drive the real scheduler, pool and
# cache in milliseconds; the simulator's tests (seconds each) are left out to keep runs short.
SCHEDULING_TESTS = ["tests/test_fairness.py", "tests/test_progress_guard.py"]
# the model-free share_prompt test first (milliseconds), then the property test (tens of seconds)
PREFIX_CACHE_TESTS = ["tests/test_prefix_cache_sharing.py", "tests/test_prefix_cache.py"]
MODULES = {
    "kv_pool": ("lightllm_nb/kv/kv_pool.py", [*SCHEDULING_TESTS, *PREFIX_CACHE_TESTS]),
    "prefix_cache": ("lightllm_nb/kv/prefix_cache.py", [*SCHEDULING_TESTS, *PREFIX_CACHE_TESTS]),
    "scheduler": ("lightllm_nb/scheduling/scheduler.py", SCHEDULING_TESTS),
    "admission": ("lightllm_nb/scheduling/admission.py", [*SCHEDULING_TESTS, "tests/test_past_future.py"]),
    "past_future": ("lightllm_nb/scheduling/past_future.py", ["tests/test_past_future.py", *SCHEDULING_TESTS]),
    "waiting_queue": ("lightllm_nb/scheduling/waiting_queue.py", SCHEDULING_TESTS),
    "sampler": ("lightllm_nb/engine/sampler.py", ["tests/test_sampler.py"]),
}
# Engine-level tests inside those files, deselected by name (each loads a model).
SKIP_TESTS = ("not flood and not engine and not shared_prefix and not cached_tokens and not resumes_from"
              " and not diverging_inside_a_page")
EXTRA_TEST_GLOBS = ["tests/test_scheduling_*.py"]  # model-free scheduling tests, wherever they cover

_SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
               ast.Mod: ast.FloorDiv, ast.Div: ast.Mult}
_SWAP_CALL = {"min": "max", "max": "min", "any": "all", "all": "any"}


# ---- finding and applying mutations ---------------------------------------------------------------
def _skipped_subtrees(tree: ast.AST) -> set[int]:
    """Nodes never mutated: docstrings and messages, annotations, raise statements (their conditions
    are mutated where they are tested), and TYPE_CHECKING imports."""
    skip: set[int] = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Import, ast.ImportFrom)):
            mark(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            mark(node)   # docstrings
        elif isinstance(node, ast.arg) and node.annotation is not None:
            mark(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            mark(node.returns)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            mark(node)
    return skip


def _mutations_of(node: ast.AST) -> list[tuple[str, callable]]:
    """(description, function that mutates a copy of `node` in place) for every mutation of `node`."""
    found = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _SWAP_COMPARE:
                new = _SWAP_COMPARE[type(op)]
                found.append((f"{type(op).__name__} -> {new.__name__}",
                              lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP_BINOP:
        new = _SWAP_BINOP[type(node.op)]
        found.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        found.append((f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        found.append((f"{node.value} -> {node.value + 1}", lambda n: setattr(n, "value", n.value + 1)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        found.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        found.append((f"drop {type(node.op).__name__}", "unwrap"))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SWAP_CALL:
        new = _SWAP_CALL[node.func.id]
        found.append((f"{node.func.id} -> {new}", lambda n, new=new: setattr(n.func, "id", new)))
    elif isinstance(node, ast.Break):
        found.append(("break -> continue", "continue"))
    elif isinstance(node, ast.Continue):
        found.append(("continue -> break", "break"))
    elif isinstance(node, (ast.AugAssign, ast.Expr)) and not isinstance(getattr(node, "value", None), ast.Constant):
        found.append(("statement -> pass", "pass"))
    return found


class _Replace(ast.NodeTransformer):
    def __init__(self, target: int, how):
        self.target, self.how, self.index = target, how, -1

    def visit(self, node):
        self.index += 1
        if self.index != self.target:
            return self.generic_visit(node)
        if self.how == "unwrap":
            return node.operand
        if self.how in ("pass", "continue", "break"):
            return {"pass": ast.Pass, "continue": ast.Continue, "break": ast.Break}[self.how]()
        self.how(node)
        return node


def find_mutants(source: str) -> list[dict]:
    """Every mutant of `source`: its node (pre-order index), line, description and mutated source."""
    tree = ast.parse(source)
    skip = _skipped_subtrees(tree)
    lines = source.splitlines()
    mutants = []
    for index, node in enumerate(_preorder(tree)):
        if id(node) in skip:
            continue
        for description, how in _mutations_of(node):
            mutated = _Replace(index, how).visit(copy.deepcopy(tree))
            ast.fix_missing_locations(mutated)
            mutants.append({"line": node.lineno, "change": description, "code": lines[node.lineno - 1].strip(),
                            "source": ast.unparse(mutated)})
    return mutants


def _preorder(tree: ast.AST):
    """Nodes in the order _Replace visits them (NodeTransformer's generic_visit order)."""
    yield tree
    for _, value in ast.iter_fields(tree):
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, ast.AST):
                yield from _preorder(item)


# ---- running the tests against each mutant ----------------------------------------------------------
def private_copy(workdir: Path) -> str:
    """The committed tree (HEAD) in `workdir`, fresh; returns the commit id."""
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "HEAD"], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(workdir)], stdin=archive.stdout, check=True)
    archive.wait()
    return commit


def warm_up(workdir: Path) -> None:
    """Import the heavy dependencies once: every mutant's test run is a fork of this process, so it
    pays only for importing the (mutated) package and the tests, not torch and transformers."""
    sys.path.insert(0, str(workdir))
    sys.path.insert(0, str(workdir / "tests"))
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py sets it without a GPU
    import hypothesis, numpy, pytest, torch, transformers  # noqa: F401  (loaded for the forks)
    import lightllm_nb.engine.engine  # noqa: F401  (its dependencies stay; the package is re-imported)
    import tiny_models  # noqa: F401  (conftest's; it loads transformers' model classes: ~10 CPU s a run)
    import lightllm_nb.notebook.panels  # noqa: F401  (the KV grid test's: ipywidgets stays loaded)
    _forget_package()


def _forget_package() -> None:
    for name in [m for m in sys.modules if m == "lightllm_nb" or m.startswith("lightllm_nb.")]:
        del sys.modules[name]


# A hang is told from a starved run by CPU time, not wall time: under `nice -n 19` on shared cores a
# mutant's tests may wait minutes for a core (the first campaign's "timeouts" were that), while a
# livelocked loop burns its CPU. The wall-clock cap catches only a run blocked without computing.
WALL_CAP_SECONDS = 3600
# A runaway loop can also allocate: prefix_cache:109 (an endless split inside `match`) reached 10 GB
# before its CPU limit on a 23 GB machine shared by five people. Past this resident size the
# mutant's run is stopped and recorded as a timeout too (`by_memory_limit`).
MEMORY_CAP_BYTES = 6 << 30


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_bytes(pid: int) -> int:
    """Resident set size of process `pid` (0 once it has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_tests(workdir: Path, tests: list[str], cpu_limit: float) -> tuple[str, float, float, str]:
    """("passed" | "failed" | "hung" | "timeout" | "memory", wall seconds, CPU seconds, the first failing
    test) for the tests in `workdir`, run by pytest in a fork of this (warmed-up) process; "timeout"
    once the run has used `cpu_limit` CPU seconds (or WALL_CAP_SECONDS of wall time), "memory" once it
    holds MEMORY_CAP_BYTES."""
    shutil.rmtree(workdir / ".hypothesis", ignore_errors=True)  # no examples remembered from other mutants
    log = workdir / "mutant-run.log"
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: fresh package and tests, output to the log, exit with pytest's code
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(workdir)
            import hypothesis
            import pytest
            # A failure is enough: shrinking it to a minimal example can take longer than the run.
            hypothesis.settings.register_profile("mutation", phases=[hypothesis.Phase.explicit,
                                                                     hypothesis.Phase.reuse, hypothesis.Phase.generate])
            hypothesis.settings.load_profile("mutation")
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", "-o", "timeout=0",
                                    "-k", SKIP_TESTS, *tests]))
        finally:
            os._exit(code)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        seconds = time.perf_counter() - started
        if done:
            cpu = usage.ru_utime + usage.ru_stime
            break
        cpu = cpu_seconds(pid)
        over_memory = resident_bytes(pid) > MEMORY_CAP_BYTES
        if cpu > cpu_limit or seconds > WALL_CAP_SECONDS or over_memory:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "memory" if over_memory else "timeout", seconds, cpu, ""
        time.sleep(0.1)
    if os.waitstatus_to_exitcode(status) == 0:
        return "passed", seconds, cpu, ""
    out = log.read_text(errors="replace").splitlines()
    failed = [line.split(" ")[1] for line in out if line.startswith(("FAILED ", "ERROR "))]
    hung = any("Timeout (>" in line for line in out)  # failed at a test's own time limit: a hang
    first = failed[0] if failed else f"exit {os.waitstatus_to_exitcode(status)}"
    return "hung" if hung else "failed", seconds, cpu, first


def already_run(records: list[Path]) -> set[tuple]:
    """(id, line, change, code) of every mutant with a record in `records`. The line, change and code
    are part of the key because ids are positional: after an edit to the module the same id can name
    another mutant, which must then run again."""
    done = set()
    for path in records:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["id"], r["line"], r["change"], r["code"]))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated, from: " + ", ".join(MODULES))
    parser.add_argument("--per-module", type=int, default=40, help="mutants sampled per module (0: all)")
    parser.add_argument("--mutants", default="", help="exact mutant ids module:index, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--code-from", default=None,
                        help="take the mutated modules from this commit (the tests stay HEAD's): rerun "
                             "an earlier campaign's mutants against newer tests")
    parser.add_argument("--skip-done", default="",
                        help="comma-separated JSONL records: mutants recorded there (the same site and change) "
                             "are not run again")
    parser.add_argument("--timeout", type=float, default=None,
                        help="CPU seconds per mutant; given, the unmutated run that checks the tests pass is skipped")
    parser.add_argument("--workdir", default="/tmp/lightllm-nb-mutation", help="private copy of the tree")
    parser.add_argument("--out", default=None, help="JSONL records (default bench/records/mutation-<date>.jsonl)")
    args = parser.parse_args()
    os.nice(19 - os.nice(0))  # 2 shared cores: everyone else's work goes first

    workdir = Path(args.workdir)
    commit = private_copy(workdir)
    if args.code_from:
        commit = subprocess.check_output(["git", "rev-parse", "--short", args.code_from], cwd=REPO, text=True).strip()
        for path, _ in MODULES.values():
            source = subprocess.check_output(["git", "show", f"{commit}:{path}"], cwd=REPO, text=True)
            (workdir / path).write_text(source)
    warm_up(workdir)
    extra = sorted(str(p.relative_to(workdir)) for g in EXTRA_TEST_GLOBS for p in workdir.glob(g))
    chosen: dict[str, list[int] | None] = {}
    if args.mutants:
        for mid in args.mutants.split(","):
            name, index = mid.split(":")
            chosen.setdefault(name, []).append(int(index))
    else:
        chosen = {name: None for name in args.modules.split(",")}
    unknown = set(chosen) - MODULES.keys()
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}: pick from {', '.join(MODULES)}")
    out = Path(args.out or REPO / f"bench/records/mutation-{datetime.date.today()}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = already_run([Path(p) for p in args.skip_done.split(",") if p])

    for name, indices in chosen.items():
        path, tests = MODULES[name]
        tests = extra + tests  # the model-free scheduling tests first: they fail fastest
        original = (workdir / path).read_text()
        mutants = find_mutants(original)
        recorded = {i for i, m in enumerate(mutants) if (f"{name}:{i}", m["line"], m["change"], m["code"]) in done}
        if indices is None:
            indices = [i for i in range(len(mutants)) if i not in recorded]
            if args.per_module and len(indices) > args.per_module:
                indices = sorted(random.Random(f"{args.seed}:{name}").sample(indices, args.per_module))
        else:
            indices = [i for i in indices if i not in recorded]
        if recorded:
            print(f"{name}: {len(recorded)} mutants already recorded, not run again", flush=True)
        if args.timeout:
            timeout = args.timeout
            print(f"{name}: {len(indices)} of {len(mutants)} mutants, unmutated run skipped", flush=True)
        else:
            status, _, baseline, first = run_tests(workdir, tests, cpu_limit=1800)
            if status != "passed":
                sys.exit(f"{name}: the tests fail on the unmutated code ({first}): fix that first")
            # above the model-free tests' own 60 s limit (tests/model_free.py HANG_SECONDS), so a loop
            # that never ends fails as the test it hung in, not as an anonymous timeout
            timeout = max(120.0, 4 * baseline)
            print(f"{name}: {len(indices)} of {len(mutants)} mutants, tests take {baseline:.0f} CPU s", flush=True)
        try:
            for index in indices:
                mutant = mutants[index]
                (workdir / path).write_text(mutant["source"])
                status, seconds, cpu, first = run_tests(workdir, tests, timeout)
                result = {"passed": "survived", "failed": "killed", "hung": "killed", "timeout": "timeout",
                          "memory": "timeout"}[status]
                record = {"id": f"{name}:{index}", "module": path, "line": mutant["line"], "change": mutant["change"],
                          "code": mutant["code"], "result": result, "killed_by": first, "seconds": round(seconds, 1),
                          "cpu_seconds": round(cpu, 1), "by_time_limit": status == "hung",
                          "by_memory_limit": status == "memory",
                          "of": len(mutants), "commit": commit, "date": str(datetime.date.today())}
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  {record['id']:>18} line {mutant['line']:>4} {mutant['change']:<22} {result:<8} "
                      f"{first or ''}  | {mutant['code'][:70]}", flush=True)
        finally:
            (workdir / path).write_text(original)


if __name__ == "__main__":
    main()
