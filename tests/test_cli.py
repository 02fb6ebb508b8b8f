"""Errors a user can cause end in one sentence and exit code 2, before training; --help in four groups;
the one writer of splits.json."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from plumbing import checkpoint
import finetune
from plumbing import flags
import pretrain_cass
import pretrain_dino
from plumbing import runtime
from conftest import TINY, class_folders, write_image
from data import DataIndex
from plumbing.models import create_model
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv, env=None):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr.strip().splitlines()


def test_frac_outside_zero_to_one_is_a_usage_error_and_one_is_allowed(capsys):
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit) as stop:
            finetune.parse_args(["--ckpt", "x.pt", "--frac", bad])
        assert stop.value.code == 2 and "--frac: must be in (0, 1]" in capsys.readouterr().err
    assert finetune.parse_args(["--ckpt", "x.pt", "--frac", "1"]).frac == 1.0  # the interval's closed end


def test_missing_imagenet_weights_name_the_offline_options(tmp_path):
    class_folders(tmp_path / "d", {"a": 3, "b": 3})
    code, err = cli("pretrain_cass.py", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                    "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32", "--workers", "0",
                    env={"HF_HUB_OFFLINE": "1"})
    assert code == 2 and [line for line in err if "error" in line] == err[-1:]
    assert "could not fetch ImageNet weights for test_resnet" in err[0] and "--cnn-weights" in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--cnn", "no_such_model"], "unknown timm model 'no_such_model'"),
    (["--swa-start", "9"], "--swa-start must be between 1 and --epochs"),
    (["--bs", "1"], "--bs must be at least 2"),
])
def test_bad_pretraining_flags(tmp_path, argv, message):
    class_folders(tmp_path / "d", {"a": 2})
    args = pretrain_cass.parse_args(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--epochs", "2",
                                     *TINY, *argv])
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        pretrain_cass.main(args)
    assert not (tmp_path / "o").exists()  # nothing written before the flags are checked


def test_bad_checkpoints_are_refused(tmp_path):
    def run(path):
        finetune.main(finetune.parse_args(["--ckpt", str(path), "--workers", "0"]))

    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        run(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        run(tmp_path / "text.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_model.pt")  # a whole-model pickle
    with pytest.raises(UserError, match="refusing to unpickle"):
        run(tmp_path / "pickled_model.pt")
    checkpoint.save({"kind": "resume"}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=f"expected a 'model' one; it holds a run's state: continue its run with "
                                        f"--resume {tmp_path}, or fine-tune"):
        run(tmp_path / "last.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pt is empty"):
        run(tmp_path / "empty.pt")


def test_finetune_needs_labels_and_one_source(tmp_path):
    with pytest.raises(UserError, match="either --ckpt"):
        finetune.main(finetune.parse_args(["--ckpt", "a.pt", "--arch", "test_vit"]))
    (tmp_path / "flat").mkdir()
    for i in range(5):
        write_image(tmp_path / "flat" / f"{i}.png", seed=i)
    with pytest.raises(UserError, match="has no labels"):
        finetune.main(finetune.parse_args(["--arch", "test_vit", "--no-pretrained", "--data", str(tmp_path / "flat"),
                                           "--img-size", "32", "--out", str(tmp_path / "o"), "--workers", "0"]))


def test_local_weight_files_initialise_cnn_and_vit(tmp_path):
    for arch in ("test_resnet", "test_vit"):
        source = timm.create_model(arch, img_size=32) if arch == "test_vit" else timm.create_model(arch)
        torch.save(source.state_dict(), tmp_path / f"{arch}.pth")
        model = create_model(arch, img_size=32, weights=str(tmp_path / f"{arch}.pth"))
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (arch, key)
    with pytest.raises(UserError, match="--weights .* does not exist"):
        create_model("test_vit", img_size=32, weights=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("script,argv,message", [
    ("pretrain_dino.py", ["--global-scale", "0.5", "0.2"], "--global-scale must be two numbers"),
    ("pretrain_dino.py", ["--momentum-teacher", "1.5"], "--momentum-teacher must be in"),
    ("pretrain_dino.py", ["--arch", "resnet_9000"], "unknown timm model"),
    ("pretrain_cass.py", ["--eta-min", "-1"], "--eta-min must be 0 or more"),
    ("pretrain_cass.py", ["--data", "/no/such/folder"], "--data /no/such/folder does not exist"),
    ("finetune.py", ["--arch", "test_vit", "--gamma", "-2"], "--gamma must be 0 or more"),
])
def test_flag_errors_are_one_line_and_exit_2_before_any_model(tmp_path, script, argv, message, monkeypatch,
                                                             capsys):
    """Through each script's entry point (flags.run_cli, as `python script.py` runs it)."""
    class_folders(tmp_path / "d", {"a": 2})
    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [script, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                                      "--workers", "0", *argv])
    with pytest.raises(SystemExit) as stop:
        flags.run_cli(module.main, module.parse_args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_threads_leave_the_loader_workers_their_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    try:
        runtime.set_threads(None, workers=2)
        assert torch.get_num_threads() == 4
        runtime.set_threads(None, workers=8)
        assert torch.get_num_threads() == 1  # never fewer than one
        runtime.set_threads(3, workers=2)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(5)
        runtime.set_threads(0, workers=2)  # 0: PyTorch's own choice, left alone
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        runtime.set_threads(None, workers=2)  # the user's OMP_NUM_THREADS wins
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def help_sections(script, capsys) -> dict[str, list[str]]:
    """--help as {group title: one flattened entry per flag}."""
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    blocks = capsys.readouterr().out.split("\n\n")
    return {block.split(":\n")[0]: [" ".join(e.split()) for e in re.split(r"\n(?=  -)", block)[1:]]
            for block in blocks}


@pytest.mark.parametrize("script, ablation, outside", [
    (pretrain_cass, "--cnn-opt", []), (pretrain_dino, None, []),
    (finetune, "--aug", ["--ckpt", "--arch", "--weights"]),  # what is fine-tuned comes first
])
def test_help_shows_every_flag_with_its_default_in_one_of_the_four_groups(script, ablation, outside, capsys):
    sections = help_sections(script, capsys)
    assert [e.split()[0].rstrip(",") for e in sections["options"]] == ["-h", *outside]
    for title, flag in (("the paper's settings", "--epochs"), ("ours, beyond the paper", "--duplicates"),
                        ("running", "--workers"), ("the paper's ablations", ablation)):
        assert any(e.startswith(f"{flag} ") for e in sections[title]) if flag else title not in sections, (title, flag)
    defaults = vars(script.parse_args([]))
    for title in ("the paper's settings", "the paper's ablations", "ours, beyond the paper", "running"):
        for entry in sections.get(title, []):  # one default each; a flag without one may say what happens instead
            has_default = defaults[entry.split()[0].rstrip(",").lstrip("-").replace("-", "_")] is not None
            assert entry.count("(default: ") == 1 if has_default else entry.count("(default: ") <= 1, entry
            assert "(default: None)" not in entry, entry


def test_every_cass_paper_setting_names_its_place_in_the_paper(capsys):
    for entry in help_sections(pretrain_cass, capsys)["the paper's settings"]:
        assert re.search(r"\b(App\. C\.\d|Sec\. \d|Alg\. 1)", entry), entry


def test_write_splits_records_the_data_the_split_and_each_images_group(tmp_path):
    index = DataIndex(tmp_path, tmp_path, "class folders", ["a.png", "b.png"], None, [], groups=["p1", "p1"])
    runtime.write_splits(tmp_path, index, {"train": ["a.png"], "val": [], "test": ["b.png"]}, seed=3)
    written = json.loads((tmp_path / "splits.json").read_text())
    assert list(written) == ["data", "layout", "seed", "classes", "skipped", "train", "val", "test", "groups"]
    assert written["groups"] == {"a.png": "p1", "b.png": "p1"} and written["seed"] == 3
    runtime.write_splits(tmp_path, index, {"train": [], "groups": {"a.png": "old"}})
    assert json.loads((tmp_path / "splits.json").read_text())["groups"] == {"a.png": "old"}  # a saved split's own


def test_help_names_each_script_as_it_is_run(monkeypatch):
    """A module of a folder runs as `python -m folder.name` (from the repository root); --help says so."""
    for path, name in (("tools/predict.py", "python -m tools.predict"), ("evaluation/report.py",
                       "python -m evaluation.report"), ("pretrain_cass.py", "pretrain_cass.py")):
        monkeypatch.setattr(sys, "argv", [str(ROOT / path)])
        assert flags.program() == name
