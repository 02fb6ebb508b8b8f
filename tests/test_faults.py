"""Runs that survive: a killed process, a NaN, a full disk, a failed save, Ctrl-C."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import losses
import pretrain_cass
import runtime
from conftest import TINY, interrupted_run, same_weights
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def cass_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), *TINY, *extra]


def saved_epoch(path: Path) -> int:
    try:
        return checkpoint.load(path, kind="resume")["epoch"]
    except UserError:
        return 0


def test_killed_subprocess_resumes_to_the_weights_of_an_uninterrupted_run(demo_data, tmp_path):
    argv = ["--epochs", "12", "--cache-dir", str(tmp_path / "cache")]
    pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "full", *argv)))
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_cass.py"), *cass_args(demo_data, tmp_path / "run"),
                             *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while saved_epoch(tmp_path / "run" / "last.pt") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    epoch = saved_epoch(tmp_path / "run" / "last.pt")
    assert 3 <= epoch < 12
    resumed = subprocess.run([sys.executable, str(ROOT / "pretrain_cass.py"), "--resume", str(tmp_path / "run"),
                              "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after epoch {epoch}" in resumed.stdout
    for role in ("cnn", "vit"):
        assert same_weights(tmp_path / "full" / f"{role}.pt", tmp_path / "run" / f"{role}.pt"), role


def nan_between(first: int, last: int = 10**9):
    """cass_loss, but NaN for calls first..last (1-based)."""
    real, count = losses.cass_loss, [0]

    def loss(r, t):
        count[0] += 1
        value = real(r, t)
        return value * float("nan") if first <= count[0] <= last else value

    return loss


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_cass, "cass_loss", nan_between(6))  # 5 steps per epoch: epoch 2 goes bad
    with pytest.raises(UserError, match="non-finite at epoch 2, step 1"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "3")))
    state = checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["cnn"]["model"].values() if v.is_floating_point())


def test_fp16_skips_non_finite_steps_and_stops_when_an_epoch_makes_no_step(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_cass, "cass_loss", nan_between(6, 8))  # 3 bad steps in epoch 2
    out = pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "a", "--epochs", "2",
                                                                "--amp", "fp16")))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [40, 16] and math.isfinite(log[1]["loss"])
    monkeypatch.setattr(pretrain_cass, "cass_loss", nan_between(6))
    with pytest.raises(UserError, match="every step of epoch 2 had a non-finite loss"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "b", "--epochs", "3",
                                                              "--amp", "fp16")))
    state = checkpoint.load(tmp_path / "b" / "last.pt", kind="resume")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["vit"]["model"].values() if v.is_floating_point())


def test_full_disk_is_detected_before_training(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="GiB free but checkpoints need"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "1")))
    assert not (tmp_path / "r" / "log.jsonl").exists()


def test_a_failed_save_keeps_the_previous_checkpoint(demo_data, tmp_path, monkeypatch):
    real, calls = torch.save, [0]

    def failing_second_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_second_save)
    with pytest.raises(UserError, match="No space left on device.*previous one is intact"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "3")))
    assert checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")["epoch"] == 1
    assert [p.name for p in (tmp_path / "r").glob(".*.tmp")] == []


def test_save_every_and_interrupt(demo_data, tmp_path, capsys):
    args = pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "5", "--save-every", "2"))
    interrupted_run(pretrain_cass, args, epoch=3)  # Ctrl-C as the 4th epoch starts
    assert checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")["epoch"] == 2
    assert f"continue with --resume {tmp_path / 'r'}" in capsys.readouterr().out
    pretrain_cass.main(pretrain_cass.parse_args(["--resume", str(tmp_path / "r"), "--workers", "0"]))
    assert checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")["epoch"] == 5  # the last epoch is saved


def test_unwritable_output_folder_is_an_error_before_training(demo_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to output folder"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "file" / "run", "--epochs", "1")))
