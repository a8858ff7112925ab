"""Which tests prove which catalog row: ``evidence.json``, generated from the tests' ``dsk`` markers.

The tests are not shipped with pforte, so the report cannot ask pytest. Instead this module reads
the test files with :mod:`ast` (nothing is imported or run) and collects every
``@pytest.mark.dsk("…")`` on a test function or method, and every ``pytestmark`` at module level
that carries one (then it applies to every test in the file). The result is committed as
``src/pforte/compliance/evidence.json``; ``make compliance-evidence`` (``python -m
pforte.compliance.evidence``) writes it, and a unit test regenerates it in memory and fails when
the committed file is stale, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path

EVIDENCE_FILE = "evidence.json"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/pforte/compliance/evidence.py -> repository

Evidence = dict[str, list[str]]


def _dsk_ids(node: ast.expr) -> list[str]:
    """The catalog ids of ``pytest.mark.dsk("…", …)`` (or ``mark.dsk(…)``), else nothing."""
    if isinstance(node, ast.List | ast.Tuple):
        return [i for item in node.elts for i in _dsk_ids(item)]
    if not isinstance(node, ast.Call):
        return []
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "dsk"):
        return []
    owner = func.value
    is_mark = (isinstance(owner, ast.Attribute) and owner.attr == "mark") or (
        isinstance(owner, ast.Name) and owner.id == "mark"
    )
    if not is_mark:
        return []
    return [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _module_ids(tree: ast.Module) -> list[str]:
    """Ids from ``pytestmark = …`` at module level."""
    found: list[str] = []
    for stmt in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        if value is not None and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            found.extend(_dsk_ids(value))
    return found


def _tests(body: list[ast.stmt], prefix: str) -> list[tuple[str, list[str]]]:
    """(node id suffix, ids of its own markers) of every test function, descending into Test classes."""
    out: list[tuple[str, list[str]]] = []
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name.startswith("test"):
            ids = [i for d in stmt.decorator_list for i in _dsk_ids(d)]
            out.append((prefix + stmt.name, ids))
        elif isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
            # A class's own decorators and its ``pytestmark`` attribute apply to every method.
            class_ids = [i for d in stmt.decorator_list for i in _dsk_ids(d)]
            class_ids += _module_ids(ast.Module(body=stmt.body, type_ignores=[]))
            for name, ids in _tests(stmt.body, f"{prefix}{stmt.name}::"):
                out.append((name, class_ids + ids))
    return out


def scan_file(path: Path, node_path: str) -> Evidence:
    """The evidence one test file gives: catalog id -> node ids."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_ids = _module_ids(tree)
    found: Evidence = {}
    for name, ids in _tests(tree.body, f"{node_path}::"):
        for dsk_id in dict.fromkeys(module_ids + ids):
            found.setdefault(dsk_id, []).append(name)
    return found


def scan(root: Path = REPO_ROOT, tests_dir: str = "tests") -> Evidence:
    """Every test file under ``root/tests_dir``: catalog id -> sorted node ids."""
    found: Evidence = {}
    base = root / tests_dir
    for path in sorted(base.rglob("test_*.py")):
        node_path = path.relative_to(root).as_posix()
        for dsk_id, names in scan_file(path, node_path).items():
            found.setdefault(dsk_id, []).extend(names)
    return {k: sorted(set(v)) for k, v in sorted(found.items())}


def dumps(evidence: Evidence) -> str:
    """The committed file's exact text (stable order, one trailing newline)."""
    return json.dumps(evidence, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def committed_path() -> Path:
    """Where the committed file lives in the source tree."""
    return Path(__file__).with_name(EVIDENCE_FILE)


@cache
def load() -> Evidence:
    """The committed evidence shipped with pforte (empty if the file is missing)."""
    try:
        text = resources.files("pforte.compliance").joinpath(EVIDENCE_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = json.loads(text)
    return {str(k): [str(n) for n in v] for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the evidence file; exit 1 when the check finds it stale."""
    parser = argparse.ArgumentParser(prog="python -m pforte.compliance.evidence", description=__doc__)
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root holding tests/")
    parser.add_argument("--out", type=Path, default=None, help="default: the committed evidence.json")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    out: Path = args.out or committed_path()
    text = dumps(scan(args.root))
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is stale; run make compliance-evidence", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    total = sum(len(v) for v in json.loads(text).values())
    print(f"wrote {out}: {len(json.loads(text))} catalog rows, {total} test references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
