"""The tree itself: the reader's limits on product code, and nothing that only one machine can resolve.

Product code is every top-level module (the files a reader opens beside the papers). Its limits: lines within 120
columns, functions within 40 lines and 6 arguments (self/cls/ctx not counted). Every tracked text file: no absolute
path of a machine (a home, a scratch or a work folder), so that what the repository says can be retyped anywhere.
"""
import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = sorted(REPO.glob("*.py"))
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|work|root|Users|mnt|scratch)/[\w.-]")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git: every file but what .gitignore names
        skip = {".git", ".venv", ".ci-venv", "out", "models", "__pycache__", ".pytest_cache", ".ruff_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    out = []
    for name in names:
        path = REPO / name
        if path.suffix in (".py", ".md", ".txt", ".json", ".toml", ".cfg", ".sh") or name.startswith(".ci/"):
            out.append(path)
    return out


# Functions a reader follows as one sequence, where a split would only move lines out of sight: the RL step and its
# minibatch gradients, each with every variant's line (DAPO's filter and shaping, GSPO, the sampler correction) in it.
LONGER = {"rl_step": 50, "minibatch_gradients": 50}


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
        if node.end_lineno - node.lineno + 1 > LONGER.get(node.name, 40):
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


# ----------------------------------------------------------------------------------------------------------------------
# The README as a front door, and the pages it links (STYLE.md, principles 8 and 9)
# ----------------------------------------------------------------------------------------------------------------------
README = REPO / "README.md"
PAGES = [README, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # fenced blocks and inline code: their brackets are not links


def links(page: Path) -> list[str]:
    """The targets of the Markdown links and images of `page`, outside code."""
    return LINK.findall(CODE.sub("", page.read_text(encoding="utf-8")))


def is_relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) and not target.startswith("#")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", text)}


def test_readme_is_at_most_15000_characters():
    """Guards the front door's size: studies, derivations and operations belong in docs/ and benchmarks/README.md."""
    assert len(README.read_text(encoding="utf-8")) <= 15_000


def test_every_relative_link_of_the_pages_resolves_to_a_file():
    """Guards against a link or an image left pointing at a file that moved or never existed."""
    assert len(PAGES) >= 3 and all(p.exists() for p in PAGES), PAGES
    broken = [f"{page.relative_to(REPO)}: {target}" for page in PAGES for target in links(page)
              if is_relative(target) and not (page.parent / target.split("#")[0]).resolve().is_file()]
    assert sum(len(links(p)) for p in PAGES) >= 10
    assert broken == []


def test_every_anchor_of_the_pages_names_a_heading():
    """Guards against a link into a section that was renamed or moved to another page."""
    broken = []
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            if anchor and is_relative(target) or target.startswith("#"):
                where = (page.parent / path).resolve() if path else page
                if where.suffix == ".md" and anchor not in anchors(where):
                    broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_link_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](missing.md) ![img](x.png) `[code](not-a-link.md)`\n")
    assert links(page) == ["#a-title", "missing.md", "x.png"]
    assert anchors(page) == {"a-title"} and slug("Memory of the --model path") == "memory-of-the---model-path"


def test_every_docs_page_is_linked_from_the_readme():
    """Guards against a page in docs/ that no reader can reach from the front door."""
    linked = {(REPO / t.split("#")[0]).resolve() for t in links(README) if is_relative(t)}
    assert [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_rooms_stay_short_and_plumbing_is_gone():
    """Guards the file sizes of STYLE.md principle 8 (≤ 400 lines a room, train.py ≤ 600) and the split of plumbing.py
    into rooms named for their concepts."""
    assert not (REPO / "plumbing.py").exists()
    lengths = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PRODUCT}
    assert "train.py" in lengths
    assert {name: n for name, n in lengths.items() if n > (600 if name == "train.py" else 400)} == {}


def top_level_names(path: Path) -> set[str]:
    """The functions, classes and assigned names at the top of a module."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        for target in node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]:
            out |= {target.id} if isinstance(target, ast.Name) else set()
    return out


def stale_names(page: Path, modules: dict[str, set[str]]) -> list[str]:
    """`module.name` and `module.py:name` in the inline code of `page`, for a top-level module, that it lacks."""
    out = []
    for code in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
        for module, name in re.findall(r"(?<![\w./])(\w+)(?:\.py:|\.)(\w+)", code):
            if module in modules and name not in ("py", "json", "jsonl", "md", "png") and name not in modules[module]:
                out.append(f"{page.name}: {module}.{name}")
    return out


def test_every_function_the_pages_name_exists():
    """Guards against a page citing a function that moved to another room or was renamed (`plumbing.shard`)."""
    modules = {p.stem: top_level_names(p) for p in PRODUCT}
    cited = sum(len(re.findall(r"`(?:train|ppo|grpo|gae)\.\w+", p.read_text(encoding="utf-8"))) for p in PAGES)
    assert cited >= 10 and [s for page in PAGES for s in stale_names(page, modules)] == []


def test_the_name_checker_sees_a_moved_function(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`rewards.py:last_token_scores`, `rewards.math_reward`, `metrics.jsonl`, `train.py`\n")
    assert stale_names(page, {"rewards": {"math_reward"}, "metrics": set(), "train": set()}) == [
        "page.md: rewards.last_token_scores"]
