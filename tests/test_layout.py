"""What the README promises about the layout: the copyable modules stand
alone, and what only an option or a file type needs is loaded where that
option or file type is handled, never when a stage script starts."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPYABLE = {"data": {"errors"}, "splits": {"errors", "data"}, "pixels": {"errors"}, "losses": set(), "swa": set(),
            "dino": set(), "intervals": set(), "metrics": {"intervals"}}
# splits.py divides data.py's DataIndex, metrics.py's bootstrap intervals come from intervals.py: each pair goes
# together
EXTRAS = {"dicom", "intensity", "fingerprints", "anticollapse", "demo", "linear_probe",
          "onnx", "onnxscript", "onnxruntime"}  # ONNX: optional, absent where CI runs the lowest versions


def test_copyable_modules_import_nothing_of_the_project_but_their_companions():
    project = {p.stem for p in ROOT.glob("*.py")}
    for module, allowed in COPYABLE.items():
        body = ast.parse((ROOT / f"{module}.py").read_text()).body  # top level: what importing it loads
        names = {a.name for n in body if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in body if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert names & project <= allowed, (module, sorted(names & project - allowed))


def test_scripts_load_no_extra_when_they_start():
    code = ("import sys; import pretrain_cass, pretrain_dino, finetune, report, export, predict; "
            f"print(sorted(set(sys.modules).intersection({sorted(EXTRAS)!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
