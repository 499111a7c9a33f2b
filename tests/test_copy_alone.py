"""Each public function of the math modules can be copied out with its module's imports and the helpers that
the table of docs/copying.md ("Copying a function out") names for it, and nothing else.

For each function: its source and its helpers' sources (module constants included) are executed in a fresh namespace
holding only the module's own imports; then every global name the function's code (and its helpers') refers to must
be found there, and a set of them is called on small inputs and compared with the module's own function. The closure
of helpers is computed here from the code (names it refers to, transitively), and must equal that table.
"""
import ast
import dis
import importlib
import inspect
import re
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODULES = ["gae", "ppo", "grpo", "rewards", "memory_ledger", "logprobs"]  # the math modules (STYLE.md, principle 4)
TABLE = REPO / "docs" / "copying.md"


def code_names(code: types.CodeType) -> set[str]:
    """The global names a function's code loads (not attribute names), nested functions and comprehensions included."""
    out = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= code_names(const)
    return out


def top_level(module) -> dict[str, ast.stmt]:
    """name → its statement, for the module's functions, classes and assignments."""
    out = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def referenced(module, name: str, nodes: dict) -> set[str]:
    obj = inspect.unwrap(getattr(module, name))
    if hasattr(obj, "__code__"):  # a function: the globals its code loads (a parameter named like one is not one)
        return code_names(obj.__code__)
    return {n.id for n in ast.walk(nodes[name]) if isinstance(n, ast.Name)}  # a class or a constant


def helpers(module, name: str) -> set[str]:
    """The module-level names `name` needs, transitively (itself excluded)."""
    nodes, seen, todo = top_level(module), set(), [name]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += [u for u in referenced(module, n, nodes) if u in nodes]
    return seen - {name}


def public(module) -> list[str]:
    return [n for n, node in top_level(module).items()
            if not n.startswith("_") and isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def copying_table() -> dict[str, set[str]]:
    """docs/copying.md's table: `module.function` → the helpers it names (a row per function)."""
    out = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `(\w+)\.(\w+)` \| (.*) \|$", line)
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = set(re.findall(r"`(\w+)`", m.group(3)))
    return out


def fresh_namespace(module, name: str) -> dict:
    """Only the module's imports, then the sources of `name` and its helpers, in the module's order."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    namespace: dict = {}
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), module.__name__, "exec"), namespace)
    wanted = helpers(module, name) | {name}
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom)) and wanted & set(
        [getattr(n, "name", None)] + [t.id for t in getattr(n, "targets", [getattr(n, "target", None)])
                                      if isinstance(t, ast.Name)])]
    exec(compile(ast.Module(body=body, type_ignores=[]), module.__name__, "exec"), namespace)
    return namespace


ALL = [(m, n) for m in MODULES for n in public(importlib.import_module(m))]


@pytest.mark.parametrize("module_name, name", ALL)
def test_every_name_resolves_in_a_fresh_namespace(module_name, name):
    module = importlib.import_module(module_name)
    namespace = fresh_namespace(module, name)
    builtins = set(dir(__builtins__)) if isinstance(__builtins__, types.ModuleType) else set(__builtins__)
    for n in helpers(module, name) | {name}:
        obj = inspect.unwrap(namespace[n])
        if hasattr(obj, "__code__"):
            missing = [g for g in code_names(obj.__code__) if g not in namespace and g not in builtins]
            assert not missing, (module_name, name, n, missing)


def test_the_table_names_every_helper_and_only_those():
    """docs/copying.md's table equals the helpers computed from the code, for every public function of the math
    modules."""
    table = copying_table()
    expected = {f"{m}.{n}": helpers(importlib.import_module(m), n) for m, n in ALL}
    expected = {k: v for k, v in expected.items() if v}
    assert table == expected


def test_copied_functions_compute_what_the_modules_do():
    """A few of them, executed from the fresh namespace on small inputs, against the module's own function."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).float()
    cases = [("gae", "whiten", (x, mask)), ("gae", "compute_gae", (x, torch.randn(3, 5, generator=g), mask)),
             ("ppo", "policy_diagnostics", (x, x * 0.9, torch.randn(3, 1, generator=g), mask, (0.2, 0.28))),
             ("grpo", "group_advantages", (torch.tensor([[1.0, 0.0, 0.5, 0.5]]),)),
             ("grpo", "grpo_loss", (x, x.abs(), mask)),
             ("rewards", "math_reward", ("so it is \\boxed{\\frac{1}{2}}", "#### 0.5")),
             ("rewards", "bradley_terry_loss", (torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]))),
             ("memory_ledger", "per_rank_bytes_exact", ()),
             ("logprobs", "token_logprobs_reference", (x[..., None].expand(3, 5, 7) * torch.arange(7.0),
                                                      torch.zeros(3, 5, dtype=torch.long), 0.7))]
    for module_name, name, args in cases:
        module = importlib.import_module(module_name)
        copied = fresh_namespace(module, name)[name]
        kwargs = {"per_rank_bytes_exact": dict(shapes=[(5, 3), (7,)], world_size=2, rank=1),
                  "compute_gae": dict(lam=0.95)}.get(name, {})  # compute_gae: λ is required, by name
        ours, theirs = copied(*args, **kwargs), getattr(module, name)(*args, **kwargs)
        flat = lambda v: [v] if not isinstance(v, (dict, tuple)) else [  # noqa: E731
            y for z in (v.values() if isinstance(v, dict) else v) for y in flat(z)]
        for a, b in zip(flat(ours), flat(theirs)):
            assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), (module_name, name)
