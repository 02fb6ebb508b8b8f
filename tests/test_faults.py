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
from conftest import TIMING, TINY, same_weights
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def cass_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), *TINY, *extra]


def saved_epoch(path: Path) -> int:
    try:
        return checkpoint.load(path, kind="resume")["epoch"]
    except UserError:
        return 0


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_killed_subprocess_resumes_to_the_weights_and_log_of_an_uninterrupted_run(demo_data, tmp_path):
    """The one end-to-end resume test of pretrain_cass.py: SIGKILL (no clean-up) once last.pt holds epoch 2,
    after SWA has started averaging, then --resume; a kill between the log line and the save of an epoch
    leaves a log line that the resumed run must drop and write again."""
    argv = ["--epochs", "4", "--swa-start", "2", "--cache-dir", str(tmp_path / "cache")]
    pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "full", *argv)))
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_cass.py"), *cass_args(demo_data, tmp_path / "run"),
                             *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while saved_epoch(tmp_path / "run" / "last.pt") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    epoch = saved_epoch(tmp_path / "run" / "last.pt")
    assert 2 <= epoch <= 4  # 4: killed while averaging or saving the networks, after the last epoch
    resumed = subprocess.run([sys.executable, str(ROOT / "pretrain_cass.py"), "--resume", str(tmp_path / "run"),
                              "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after epoch {epoch}" in resumed.stdout
    for role in ("cnn", "vit"):
        assert same_weights(tmp_path / "full" / f"{role}.pt", tmp_path / "run" / f"{role}.pt"), role
    assert torch.load(tmp_path / "run" / "cnn.pt", weights_only=True)["swa_averaged"] == 3
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(tmp_path / "run")] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(tmp_path / "full")]


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


def test_save_every_saves_every_nth_epoch_and_always_the_last(demo_data, tmp_path, monkeypatch):
    real, saved = checkpoint.save, []
    monkeypatch.setattr(checkpoint, "save", lambda record, path: saved.append((path.name, record["epoch"]))
                        or real(record, path))
    pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "3",
                                                          "--save-every", "2")))
    assert [epoch for name, epoch in saved if name == "last.pt"] == [2, 3]


def test_unwritable_output_folder_is_an_error_before_training(demo_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to output folder"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "file" / "run", "--epochs", "1")))
