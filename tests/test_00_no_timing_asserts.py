"""No wall-clock figure is a pass/fail check, in a test or a notebook: a loaded machine is 3-5x slower.

Each test file and each notebook (its code cells in order) is read as Python; every name assigned from
a timing source (time.perf_counter() and its kin, a results file's "train_time_s" / "wall_time_s", a
measured throughput, a run's `seconds`), directly or through other assignments, is followed, and an
`assert` that reads one of them fails this test. Timings are printed; speed targets live in benchmarks/.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLOCK_CALLS = {
    "perf_counter",
    "perf_counter_ns",
    "monotonic",
    "monotonic_ns",
    "process_time",
    "time",
    "time_ns",
}
TIMING_CALLS = {
    "measure_throughput",
    "time_interleaved",
    "time_interleaved_samples",
    "measure_layer",
    "measure_steps",
}
TIMING_WORDS = ("time_s", "wall_time", "seconds", "elapsed", "flops_per_s", "samples_per_second")
# Fields of a timed object that do not depend on the clock (an estimate's exact step count, a device name).
EXACT_FIELDS = {
    "train_steps", "eval_steps", "steps", "name", "source", "precision", "measured", "measured_throughput", "fits",
    "shape",
}  # fmt: skip


def _is_source(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
        if name in TIMING_CALLS or (name in CLOCK_CALLS and owner in ("time", "")):
            return name != "time" or owner == "time"
    if isinstance(node, ast.Subscript):  # results["train_time_s"]
        key = node.slice
        return (
            isinstance(key, ast.Constant)
            and isinstance(key.value, str)
            and any(w in key.value for w in TIMING_WORDS)
        )
    if isinstance(node, ast.Attribute):
        return any(w in node.attr for w in TIMING_WORDS)
    return False


def _is_sign_check(node: ast.AST) -> bool:
    """`t > 0`, `t >= 0`: a sign is not a speed, and load cannot change it."""
    return (
        isinstance(node, ast.Compare)
        and all(isinstance(op, (ast.Gt, ast.GtE)) for op in node.ops)
        and all(isinstance(c, ast.Constant) and c.value == 0 for c in node.comparators)
    )


def _tainted(node: ast.AST, tainted: set[str]) -> bool:
    if _is_sign_check(node):
        return False
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "len":
        return False  # a count of samples, not a time
    if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp)):  # judged by what it yields
        local = set(tainted)
        for gen in node.generators:
            if _tainted(gen.iter, local):
                local |= _names(gen.target)
        return _tainted(node.elt, local) or any(_tainted(c, local) for g in node.generators for c in g.ifs)
    if _is_source(node):
        return True
    if isinstance(node, ast.Name):
        return node.id in tainted
    if isinstance(node, ast.Attribute) and node.attr in EXACT_FIELDS:
        return False
    return any(_tainted(child, tainted) for child in ast.iter_child_nodes(node))


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _scope_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of one scope: a function's whole body, or the module without its functions' bodies."""
    if not isinstance(scope, ast.Module):
        return list(ast.walk(scope))
    out, todo = [], list(scope.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return out


def _taint(nodes: list[ast.AST], tainted: set[str]) -> set[str]:
    tainted = set(tainted)
    changed = True
    while changed:  # flow-insensitive within the scope: follow assignments until nothing new is tainted
        changed = False
        for node in nodes:
            new: set[str] = set()
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if _tainted(node.value, tainted):
                    new = set().union(*(_names(t) for t in targets)) - tainted
            elif isinstance(node, (ast.For, ast.comprehension)) and _tainted(node.iter, tainted):
                new = _names(node.target) - tainted
            if new:
                tainted |= new
                changed = True
    return tainted


def timing_asserts(source: str) -> list[str]:
    """The asserts of `source` that read a value derived from a wall-clock measurement. Names are
    followed within their scope (a test function, or a notebook's cells together); an assert marked
    `# not wall-clock` (a fake clock, say) is left out."""
    tree = ast.parse(source)
    lines = source.splitlines()
    module_taint = _taint(_scope_nodes(tree), set())
    found = []
    for scope in [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
    ]:
        nodes = _scope_nodes(scope)
        tainted = _taint(nodes, module_taint)
        for node in nodes:
            if isinstance(node, ast.Assert) and _tainted(node.test, tainted):
                if "# not wall-clock" in lines[node.end_lineno - 1]:
                    continue
                text = ast.get_source_segment(source, node) or f"line {node.lineno}"
                if text not in found:
                    found.append(text)
    return found


def notebook_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # IPython magics and shell lines are not Python
    return "\n".join(
        "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in c.splitlines())
        for c in code
    )


FILES = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name != Path(__file__).name]
FILES += sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_no_assert_reads_a_wall_clock_figure(path):
    source = notebook_source(path) if path.suffix == ".ipynb" else path.read_text()
    assert timing_asserts(source) == []


def test_the_scanner_finds_timing_asserts_through_assignments():
    src = (
        "import time\nt0 = time.perf_counter()\nrun()\ndt = time.perf_counter() - t0\nratio = dt / 3\n"
        "assert ratio < 2\nassert res['train_time_s'] > 0\nassert n_steps == 4\n"
    )
    assert timing_asserts(src) == ["assert ratio < 2"]  # a sign check (> 0) is not a speed
    assert timing_asserts("r = run()\nassert r['wall_time_s'] < 60\n") == ["assert r['wall_time_s'] < 60"]
    assert timing_asserts("e = estimate(measure_throughput(m))\nassert e.train_steps == 4\n") == []
    assert timing_asserts("x = model(y)\nassert x.shape == (2, 3)\n") == []
    two_tests = "def a():\n    y = time.perf_counter()\n\ndef b():\n    y = model(x)\n    assert y > 3\n"
    assert timing_asserts(two_tests) == []  # one test's timing does not taint another's names
    assert timing_asserts("t = time.perf_counter()\nassert t < 9  # not wall-clock: a fake clock\n") == []
