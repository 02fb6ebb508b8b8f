"""The layout as a specification (../shared/STYLE.md), computed from the
imports: each stage script holds its own epoch loop and loads few modules,
what only an option or a file type needs loads where it is handled (never when
a script starts), the copyable modules stand alone, the import graph stays
shallow, files stay short. `python tests/test_structure.py` prints the figures."""
import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
STAGES = ("pretrain_cass", "pretrain_dino", "finetune")
COPYABLE = ("data", "splits", "pixels", "losses", "swa", "dino", "metrics")
COPIED_WITH = {"splits": {"data"}}  # splits.py divides data.py's DataIndex: the two go together
# What only an option or a file type needs: imported inside the function that handles it.
EXTRAS = {"dicom": "DICOM files", "intensity": "16-bit and float pixels", "fingerprints": "--duplicates",
          "anticollapse": "--anti-collapse", "demo": "--demo"}


def _imported(nodes) -> frozenset[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return frozenset(found & set(MODULES))


@cache
def imports(module: str) -> frozenset[str]:
    """Project modules `module` imports anywhere in its file."""
    return _imported(ast.walk(ast.parse(MODULES[module].read_text()))) - {module}


@cache
def loads(module: str) -> frozenset[str]:
    """Project modules `module` imports at its top level: what importing it loads."""
    return _imported(ast.parse(MODULES[module].read_text()).body) - {module}


def closure(module: str, edges=loads) -> set[str]:
    seen, todo = set(), list(edges(module))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges(m)
    return seen


@cache
def depth(module: str) -> int:
    """Levels of the import graph from `module` down, itself included."""
    return 1 + max((depth(m) for m in loads(module)), default=0)


def lines(modules: set[str]) -> int:
    return sum(len(MODULES[m].read_text().splitlines()) for m in modules)


# Issue 10 set 8 modules; the duplicate check (issue 12) made data.py (399 lines) split in two,
# data.py and splits.py, rather than pass the 400-line rule below: 9.
def test_each_stage_script_holds_its_epoch_loop_and_pulls_in_at_most_9_modules():
    for stage in STAGES:
        assert re.search(r"^\s+for epoch in range\(", MODULES[stage].read_text(), re.M), stage
        assert len(closure(stage)) <= 9, (stage, sorted(closure(stage)))
        assert depth(stage) <= 5, stage  # script -> runtime (which makes a pretraining split) -> splits -> data


def test_a_stage_script_loads_no_extra_until_its_option_or_file_type_is_met():
    for stage in STAGES:
        assert closure(stage) & set(EXTRAS) == set(), (stage, sorted(closure(stage) & set(EXTRAS)))
    assert set(EXTRAS) <= closure("pretrain_cass", edges=imports)  # ... and each is still reached


# The lines a reader meets when a pretraining script starts (itself included; `python -X importtime
# pretrain_cass.py --help` counts the same modules): 2,028 and 2,057 before the extras moved out.
def test_the_pretraining_scripts_load_at_most_1900_lines():
    for stage in ("pretrain_cass", "pretrain_dino"):
        assert lines(closure(stage) | {stage}) <= 1900 + 60 * (stage == "pretrain_dino"), stage


def test_copyable_modules_import_nothing_of_the_project_but_errors():
    for module in COPYABLE:
        assert loads(module) <= {"errors"} | COPIED_WITH.get(module, set()), (module, sorted(loads(module)))
        lazily = imports(module) - loads(module)
        assert lazily <= set(EXTRAS), (module, sorted(lazily))


def test_no_file_is_over_400_lines():
    assert {m: lines({m}) for m in MODULES if lines({m}) > 400} == {}


if __name__ == "__main__":
    for stage in STAGES:
        print(f"{stage}.py: epoch loop in the file; loads {len(closure(stage))} project modules "
              f"({', '.join(sorted(closure(stage)))}), {lines(closure(stage) | {stage})} lines to read "
              f"(itself included), import depth {depth(stage)}")
    print(f"deepest: {max(MODULES, key=depth)} ({max(map(depth, MODULES))} levels); longest file: "
          f"{max(MODULES, key=lambda m: lines({m}))} ({max(lines({m}) for m in MODULES)} lines)")
    print("copyable modules and their project imports: "
          + ", ".join(f"{m}: {sorted(imports(m)) or 'none'}" for m in COPYABLE))
