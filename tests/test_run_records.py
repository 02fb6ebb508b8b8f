"""One experiment, one record (issue 27): a moved run resumes in its new folder from any working folder and
refuses flags that would change it; a label fraction labels every class; maps give each image its own
overlay; a DINO run shorter than its warm-ups says so."""
import json
import shutil

import pytest
import torch

from plumbing import checkpoint
from tools import maps
import pretrain_cass
import pretrain_dino
from conftest import TINY, interrupted_run, write_image
from data import index_data
from errors import UserError
from plumbing.splits import label_fraction


def test_a_moved_demo_run_resumes_in_its_new_folder_from_another_working_folder(tmp_path, monkeypatch):
    for folder in ("first", "other", "moved"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "first")  # a relative --out, and the demo's data inside it
    interrupted_run(pretrain_cass, pretrain_cass.parse_args(["--demo", "--out", "run", "--epochs", "3", *TINY,
                                                             "--knn-every", "0"]), epoch=2)
    shutil.move(tmp_path / "first" / "run", tmp_path / "moved" / "run")
    monkeypatch.chdir(tmp_path / "other")
    pretrain_cass.main(pretrain_cass.parse_args(["--resume", "../moved/run", "--workers", "0", "--device", "cpu"]))
    run = tmp_path / "moved" / "run"
    assert (run / "cnn.pt").is_file() and (run / "vit.pt").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert checkpoint.load(run / "last.pt", kind="resume")["epoch"] == 3
    assert json.loads((run / "splits.json").read_text())["data"] == str(run / "data")  # no second demo set
    assert not (tmp_path / "first" / "run").exists() and not (tmp_path / "other" / "run").exists()


@pytest.mark.parametrize("flag", [["--epochs", "200"], ["--epochs", "100"], ["--lr", "0.01"], ["--out", "elsewhere"]])
def test_a_flag_that_would_change_a_resumed_run_is_refused(cass_run, flag):
    # --epochs 100 is the parser's default, typed: the run has 2
    with pytest.raises(UserError, match=f"^{flag[0]} {flag[1]} would change the resumed run, which has .*--device"):
        pretrain_cass.main(pretrain_cass.parse_args(["--resume", str(cass_run), *flag, "--workers", "0"]))


def test_a_label_fraction_labels_a_class_that_is_no_patients_majority(tmp_path):
    # 40 patients of 3 images, half a, half b; patients 0-9 hold one image of the rare class r each
    rows = []
    for patient in range(40):
        for k in range(3):
            cls = "r" if patient < 10 and k == 2 else "ab"[patient % 2]
            write_image(tmp_path / f"{patient}_{k}.png", size=(8, 8), seed=patient * 3 + k)
            rows.append(f"{patient}_{k}.png,p{patient}," + ",".join(str(int(cls == c)) for c in "abr"))
    (tmp_path / "labels.csv").write_text("path,patient,a,b,r\n" + "\n".join(rows) + "\n")
    index = index_data(tmp_path, workers=1, group_col="patient")
    assert index.classes == ["a", "b", "r"] and not index.multilabel
    train = list(range(len(index.paths)))
    for seed in range(10):
        chosen = label_fraction(index, train, 0.1, seed)
        assert index.class_counts(chosen).min() >= 1, seed
        groups = {index.groups[i] for i in chosen}
        assert chosen == sorted(i for i in train if index.groups[i] in groups)  # patients whole


def test_maps_give_each_image_its_own_overlay_when_file_names_repeat_across_folders(cass_run, tmp_path):
    for cls in ("blobs", "checks"):
        for i in range(5):
            write_image(tmp_path / "images" / cls / f"{i}.png", seed=hash((cls, i)) % 2**32)
    averages = maps.main(maps.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--images", str(tmp_path / "images"),
                                          "--n", "10", "--out", str(tmp_path / "maps"), "--workers", "0"]))
    (name,) = averages
    listed = (tmp_path / "maps" / "images.txt").read_text().split()
    overlays = sorted(p.relative_to(tmp_path / "maps" / name).as_posix()
                      for p in (tmp_path / "maps" / name).rglob("*.png"))
    assert len(listed) == 10 and overlays == sorted(listed)


def test_a_dino_run_shorter_than_its_warm_ups_says_so(demo_data, tmp_path, capsys):
    pretrain_dino.main(pretrain_dino.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "dino"), "--arch", "test_resnet", "--epochs", "2",
         "--no-pretrained", "--img-size", "32", "--bs", "8", "--workers", "0", "--out-dim", "64",
         "--local-crops", "2", "--knn-every", "0"]))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "run's 2 epochs: --warmup-epochs 10 (the lr" in warnings[0]
    assert "--warmup-teacher-temp-epochs 30" in warnings[0]

    def warning(*argv):
        return pretrain_dino.warmup_warning(pretrain_dino.parse_args(["--data", "x", "--epochs", "4", *argv]))
    assert warning("--warmup-epochs", "3", "--warmup-teacher-temp-epochs", "4") is None  # both end in the run
    assert "epochs: --warmup-epochs 4 (the lr" in warning("--warmup-epochs", "4", "--warmup-teacher-temp-epochs", "4")
    assert warning("--warmup-epochs", "3", "--warmup-teacher-temp-epochs", "5").endswith(
        "epochs: --warmup-teacher-temp-epochs 5; shorten it for a short run")


def test_a_resumed_run_takes_the_running_flags_typed_and_keeps_its_own_otherwise(cass_run, monkeypatch):
    # where and how fast it runs (flags.EXECUTION) may change at --resume; one not typed keeps the run's value,
    # in its settings and in the process it starts
    from plumbing import pretraining, runtime
    started = []
    monkeypatch.setattr(runtime, "start_distributed", lambda name: started.append(name) or torch.device("cpu"))
    monkeypatch.setattr(runtime, "set_threads", lambda threads, workers: started.append((threads, workers)))
    args = pretrain_cass.parse_args(["--resume", str(cass_run), "--cache", "off", "--compile"])
    cfg, state, _, _ = pretraining.start_run(args, "cass", settle=lambda c: c)
    saved = state["args"]
    assert (saved["cache"], saved["compile"], saved["workers"], saved["device"]) == ("on", False, 0, "cpu")
    assert cfg.cache == "off" and cfg.compile and cfg.cache_dir == saved["cache_dir"]
    assert (cfg.workers, cfg.device) == (0, "cpu") and started == ["cpu", (None, 0)]  # not the parser's defaults
    assert (cfg.epochs, cfg.lr, cfg.out) == (saved["epochs"], saved["lr"], str(cass_run))
