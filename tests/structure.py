"""The layout's figures, computed from the code (a script, not a test):

    python tests/structure.py          # from the code's imports
    python tests/structure.py --run    # also what a run loads, lazy imports included: each stage's demo, about a minute

For each stage script: its lines, the lines of its longest function (and of
fine-tuning's per-seed run), the
names it uses from the rest of the project (from-imported names plus attributes of imported project
modules), the project modules a run of it loads at start-up and their lines (itself
included; `python -X importtime SCRIPT --help` lists the same modules), the
depth of its import graph; then the longest file and the README's length."""
import ast
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")
           if p.parts[len(ROOT.parts)] not in ("tests", ".git") and p.name != "__init__.py"}  # by dotted name
STAGES = ("pretrain_cass", "pretrain_dino", "finetune")


def imported(nodes) -> frozenset[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return frozenset(found & set(MODULES))


@cache
def loads(module: str) -> frozenset[str]:
    """Project modules `module` imports at its top level: what importing it loads."""
    return imported(ast.parse(MODULES[module].read_text()).body) - {module}


def closure(module: str) -> set[str]:
    seen, todo = set(), list(loads(module))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += loads(m)
    return seen


@cache
def depth(module: str) -> int:
    return 1 + max((depth(m) for m in loads(module)), default=0)


def lines(modules: set[str]) -> int:
    return sum(len(MODULES[m].read_text().splitlines()) for m in modules)


def used_names(module: str) -> set[str]:
    """What a module uses of the rest of the project: names it imports from project modules, and the attributes
    it reads of the project modules it imports."""
    tree, names, aliases = ast.parse(MODULES[module].read_text()), set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    aliases[a.asname or a.name] = full
                elif node.module in MODULES:
                    names.add(full)
        elif isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in MODULES})
    return names | {f"{aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases}


def function_lines(module: str) -> dict[str, int]:
    """Lines of each function of `module`, decorators and docstring included."""
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(MODULES[module].read_text()))
            if isinstance(n, ast.FunctionDef)}


# run in a subprocess: the stage script as __main__, then the project modules the run loaded (itself aside)
PROBE = """import atexit, runpy, sys
def loaded():
    files = {{n: getattr(m, "__file__", None) or "" for n, m in sys.modules.items() if n != "__main__"}}
    ours = (n for n, f in files.items() if f.startswith({root!r}) and not f.endswith("__init__.py"))
    print("LOADED", " ".join(sorted(ours)))
atexit.register(loaded)
sys.argv = {argv!r}
sys.path.insert(0, {root!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_loads(argv: list[str]) -> set[str]:
    """The project modules a run of `argv` (a stage script and its flags) loads, lazy imports included."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT) + "/", argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return set(next(line for line in done.stdout.splitlines() if line.startswith("LOADED")).split()[1:])


def demo_loads() -> dict[str, set[str]]:
    """What each stage script's demo run loads: one epoch of each pretraining demo, a one-epoch fine-tune of the
    CASS demo's CNN."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"pretrain_cass": ["pretrain_cass.py", "--demo", "--epochs", "1", "--out", f"{tmp}/cass"],
                "pretrain_dino": ["pretrain_dino.py", "--demo", "--epochs", "1", "--out", f"{tmp}/dino"],
                "finetune": ["finetune.py", "--ckpt", f"{tmp}/cass/cnn.pt", "--epochs", "1", "--resamples", "100"]}
        return {stage: run_loads(argv) for stage, argv in runs.items()}


if __name__ == "__main__":
    for stage in STAGES:
        sizes = function_lines(stage)
        name = max(sizes, key=sizes.get)
        seed = f", run_seed {sizes['run_seed']}" if "run_seed" in sizes else ""
        print(f"{stage}.py: {lines({stage})} lines, {len(used_names(stage))} names used from the project, "
              f"longest function {name} ({sizes[name]} lines{seed}); loads "
              f"{len(closure(stage))} project modules, {lines(closure(stage) | {stage})} lines with itself "
              f"({', '.join(sorted(closure(stage)))}); import depth {depth(stage)}")
    if "--run" in sys.argv:
        for stage, found in demo_loads().items():
            print(f"{stage}.py on the demo (lazy imports included): {len(found)} project modules, "
                  f"{lines(found | {stage})} lines with itself ({', '.join(sorted(found))})")
    print(f"longest file: {max(MODULES, key=lambda m: lines({m}))} ({max(lines({m}) for m in MODULES)} lines); "
          f"README.md: {len((ROOT / 'README.md').read_text().splitlines())} lines")
