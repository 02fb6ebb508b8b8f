import json
import math

import pytest
import torch

from plumbing import checkpoint
import pretrain_cass
from conftest import TINY, class_folders, write_image
from data import index_data
from errors import UserError
from plumbing.splits import make_splits


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_run_writes_every_file_and_loadable_checkpoints(cass_run):
    for name in ("cnn.pt", "vit.pt", "last.pt", "splits.json", "log.jsonl", "args.json"):
        assert (cass_run / name).is_file(), name
    for role, arch in (("cnn", "test_resnet"), ("vit", "test_vit")):
        ckpt = torch.load(cass_run / f"{role}.pt", map_location="cpu", weights_only=True)
        assert ckpt["arch"] == arch and ckpt["role"] == role and ckpt["method"] == "cass"
        assert ckpt["img_size"] == 32 and len(ckpt["mean"]) == 3 and ckpt["num_classes"] == 1000
        assert ckpt["args"]["epochs"] == 2 and ckpt["epoch"] == 2 and ckpt["swa_averaged"] == 1
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
        assert set(ckpt["splits"]) == {"train", "val", "test", "duplicates"}
    assert checkpoint.load(cass_run / "last.pt", kind="resume")["epoch"] == 2


def test_pretraining_sees_only_the_train_split(cass_run):
    splits = json.loads((cass_run / "splits.json").read_text())
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    index = index_data(splits["data"], workers=1)
    assert splits["train"] == make_splits(index, 0)["train"]
    for record in read_log(cass_run):  # drop_last: whole batches of train images only
        assert len(splits["train"]) - 8 < record["images"] <= len(splits["train"])


def test_log_has_one_line_per_epoch_whose_numbers_agree_with_each_other(cass_run):
    log = read_log(cass_run)
    assert [r["epoch"] for r in log] == [1, 2]
    steps = 0
    for r in log:
        steps += r["images"] // 8
        # the lr after this many batches of the per-batch cosine (T_max 16, eta_min 1e-6, App. C.5.3)
        assert r["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * steps / 16)) / 2)
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=0.01)
        assert 0 <= r["loss"] <= 4 and r["eq1_loss"] == pytest.approx(r["loss"])  # nothing added to Eq. 1
        assert r["healthy_std"] == pytest.approx(1000 ** -0.5)
        assert r["collapse"] is pretrain_cass.is_collapsed(r["cnn_std"], r["vit_std"], r["cos"], r["healthy_std"])
        assert r["collapsed_arms"] == [arm for arm in ("cnn", "vit") if r[f"{arm}_std"] < r["healthy_std"] / 4]


def test_one_arm_collapsing_alone_is_flagged_once_in_full_then_in_one_line(capsys):
    """A ViT at a fifth of the healthy spread while the CNN is healthy: the arms disagree (cos low), so the
    two-arm flag stays off, and the lone arm is named."""
    cfg = pretrain_cass.parse_args(["--data", "-"])
    stats = {"loss": 0.5, "images_per_s": 10.0, "cnn_std": 0.03, "vit_std": 0.0063, "healthy_std": 0.0316,
             "cos": 0.4, "data_wait": 0.0, "collapse": False, "collapsed_arms": ["vit"]}
    warned = set()
    for epoch in range(3):
        warned = pretrain_cass.report_epoch({**stats, "epoch": epoch + 1}, epoch, cfg, warned)
    printed = capsys.readouterr().out
    assert printed.count("warning: the vit arm's outputs are nearly the same for every image") == 1
    assert printed.count("warning: the vit arm still collapses") == 2 and "cnn arm" not in printed


def test_a_folder_that_holds_a_run_is_refused_before_anything_is_written(cass_run, demo_data):
    before = {p.name: p.stat().st_mtime_ns for p in cass_run.iterdir()}
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(cass_run), *TINY]))
    assert {p.name: p.stat().st_mtime_ns for p in cass_run.iterdir()} == before


def test_collapse_is_flagged_when_every_image_gives_the_same_output(tmp_path, capsys):
    # black images stay black under every augmentation: each arm's output is the
    # same for the whole batch (std 0), and the arms learn to agree within epochs
    for cls in ("a", "b"):
        for i in range(20):
            write_image(tmp_path / "data" / cls / f"{i}.png", value=0)
    pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "4", *TINY]))
    log = read_log(tmp_path / "run")
    assert all(r["cnn_std"] == 0 and r["vit_std"] == 0 for r in log)
    assert log[0]["cos"] < 0.9 and not log[0]["collapse"]  # not yet agreeing: the loss is still high
    assert log[-1]["cos"] > 0.9 and log[-1]["collapse"] and log[-1]["loss"] < 0.2
    printed = capsys.readouterr().out
    flagged = sum(r["collapse"] for r in log)
    assert printed.count("warning: collapse suspected: both arms") == 1  # explained once ...
    assert printed.count("warning: collapse still suspected") == flagged - 1 >= 1  # ... then one line an epoch
    assert not pretrain_cass.is_collapsed(0.03, 0.03, 0.99, 0.0316)  # healthy spread, agreeing arms


def test_ablation_switches_reach_the_saved_models(demo_data, tmp_path):
    # what each switch changes in the step is in test_cass_step.py; here: that a whole run carries them through
    out = pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "abl"), "--epochs", "1", *TINY, "--head-act", "softmax",
         "--cnn-opt", "sgd", "--aug", "blur+solarize", "--sched-step", "epoch", "--no-swa", "--norm", "imagenet",
         "--cnn", "test_vit", "--cache", "off", "--cache-dir", str(tmp_path / "cache"), "--grad-ckpt"]))
    ckpt = torch.load(out / "cnn.pt", weights_only=True)
    assert ckpt["arch"] == "test_vit" and ckpt["swa_averaged"] == 0
    assert ckpt["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ckpt["args"]["head_act"] == "softmax" and ckpt["args"]["aug"] == "blur+solarize"
    assert not (tmp_path / "cache").exists()  # --cache off: nothing cached, not even the image checks
    state = checkpoint.load(out / "last.pt", kind="resume")
    assert "momentum_buffer" in state["cnn"]["opt"]["state"][0]  # SGD
    assert state["cnn"]["sched"]["last_epoch"] == 1  # stepped once, at the end of the epoch


def test_per_batch_cosine_schedule_cycles_every_32_steps(tmp_path):
    class_folders(tmp_path / "d", {"a": 80})
    pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY, "--bs", "2"]))
    state = checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")
    # 56 train images at batch 2 = 28 steps: cosine from 1e-3 with T_max 16, eta_min 1e-6,
    # past its minimum at step 16 and on the way back up
    expected = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 28 / 16)) / 2
    assert state["cnn"]["opt"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-6)


def test_anti_collapse_keeps_the_spread_where_the_faithful_run_loses_it(demo_data, tmp_path):
    def min_std(*flags):
        out = pretrain_cass.main(pretrain_cass.parse_args(
            ["--data", str(demo_data), "--out", str(tmp_path / "-".join(flags or ["none"])), "--epochs", "3", *TINY,
             "--lr", "0.003", "--knn-every", "0", "--no-swa", *flags]))
        last = read_log(out)[-1]
        assert torch.load(out / "cnn.pt", weights_only=True)["anti_collapse"] == (flags[-1] if flags else "none")
        return min(last["cnn_std"], last["vit_std"]) / last["healthy_std"]

    assert min_std() < pretrain_cass.COLLAPSE_RATIO  # from random init the ViT arm maps every image to one direction
    assert min_std("--anti-collapse", "variance") > 2 * pretrain_cass.COLLAPSE_RATIO
