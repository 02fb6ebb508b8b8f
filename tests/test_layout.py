"""What the README promises about the layout: the copyable modules stand
alone, and what only an option or a file type needs is loaded where that
option or file type is handled, never when a stage script starts."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPYABLE = {"data": {"errors"}, "plumbing.splits": {"errors", "data"},
            "plumbing.pixels": {"errors"}, "losses": set(), "swa": set(), "method.dino": set(),
            "evaluation.intervals": set(), "evaluation.metrics": {"evaluation.intervals"}}
# splits.py divides data.py's DataIndex, metrics.py's bootstrap intervals come from intervals.py: each pair goes
# together
EXTRAS = {"plumbing.dicom", "plumbing.intensity", "plumbing.fingerprints", "method.anticollapse", "plumbing.demo",
          "evaluation.linear_probe", "onnx", "onnxscript", "onnxruntime"}  # ONNX: optional, absent where CI runs
# the lowest versions
TOP = {"pretrain_cass", "pretrain_dino", "finetune", "data", "losses", "swa", "errors"}  # the card's six,
# and UserError, which the copyable modules share
FOLDERS = {"plumbing", "method", "evaluation", "tools", "study"}


def project_modules() -> dict[str, Path]:
    """Every module of the project by its dotted name (tests aside)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")
            if p.parts[len(ROOT.parts)] not in ("tests", ".git") and p.name != "__init__.py"}


def top_level_imports(path: Path) -> set[str]:
    """The project modules a file imports at its top level (what importing it loads), by dotted name."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names & set(project_modules())


def test_the_top_level_is_the_card_and_every_other_module_sits_in_a_folder_that_says_what_it_holds():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP
    assert {m.split(".")[0] for m in project_modules()} - TOP == FOLDERS


def test_copyable_modules_import_nothing_of_the_project_but_their_companions():
    modules = project_modules()
    for module, allowed in COPYABLE.items():
        found = top_level_imports(modules[module])
        assert found <= allowed, (module, sorted(found - allowed))


def test_plumbing_imports_no_stage_script_tool_or_evaluation():
    for module, path in project_modules().items():
        if module.startswith("plumbing."):
            found = {m for m in top_level_imports(path) if not m.startswith("plumbing.")} - {"data", "errors"}
            assert not found, (module, sorted(found))


def test_scripts_load_no_extra_when_they_start():
    code = ("import sys; import pretrain_cass, pretrain_dino, finetune, evaluation.report, tools.export, "
            f"tools.predict; print(sorted(set(sys.modules).intersection({sorted(EXTRAS)!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
