"""The tree itself: the reader's limits on product code, and nothing that only one machine can resolve.

Product code is every top-level module (the files a reader opens beside the papers). Its limits: lines within 120
columns, functions within 40 lines and 6 arguments (self/cls/ctx not counted). Every tracked text file: no absolute
path of a machine (a home, a scratch or a work folder), so that what the repository says can be retyped anywhere.
"""
import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = sorted(REPO.glob("*.py"))
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|work|root|Users|mnt|scratch)/[\w.-]")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    out = []
    for name in names.split():
        path = REPO / name
        if path.suffix in (".py", ".md", ".txt", ".json", ".toml", ".cfg", ".sh") or name.startswith(".ci/"):
            out.append(path)
    return out


def function_problems(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        n -= bool(a.args) and a.args[0].arg in ("self", "cls", "ctx")
        if n > 6:
            out.append(f"{path.name}:{node.lineno} {node.name} takes {n} arguments")
        if node.end_lineno - node.lineno + 1 > 40:
            out.append(f"{path.name}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines")
    return out


def test_product_code_keeps_the_readers_limits():
    assert len(PRODUCT) >= 10, [p.name for p in PRODUCT]
    problems = []
    for path in PRODUCT:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if len(line) > 120:
                problems.append(f"{path.name}:{i} is {len(line)} columns")
        problems += function_problems(path)
    assert problems == []


def test_the_limit_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(41))
    (tmp_path / "long.py").write_text(f"def f(a, b, c, d, e, f, g):\n{body}\n")
    assert len(function_problems(tmp_path / "long.py")) == 2


def test_no_absolute_machine_path_in_the_tree():
    hits = []
    for path in tracked_text_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert hits == []


def test_the_path_pattern_matches_paths_and_not_prose():
    assert MACHINE_PATH.search("--out " + "/tmp" + "/run1") and MACHINE_PATH.search('"/home' + '/me/venv/bin/python"')
    assert not MACHINE_PATH.search("tokens/s and steps/work/day") and not MACHINE_PATH.search("./tmp/x")
