"""Runs that survive: a killed process, a NaN, a full disk, a failed save, Ctrl-C."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plumbing import checkpoint
import losses
import pretrain_cass
from plumbing import pretraining
from conftest import TIMING, TINY, same_weights, write_image
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


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_weights_and_log_of_an_uninterrupted_run(demo_data, tmp_path):
    """The one end-to-end resume test of pretrain_cass.py: SIGKILL (no clean-up) once last.pt holds epoch 2,
    after SWA has started averaging, then --resume; a kill between the log line and the save of an epoch
    leaves a log line that the resumed run must drop and write again."""
    argv = ["--epochs", "4", "--swa-start", "2", "--save-minutes", "0", "--cache-dir", str(tmp_path / "cache")]
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
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "3",
                                                              "--save-minutes", "0")))
    state = checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["cnn"]["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_half_precision_skips_non_finite_steps_and_stops_when_an_epoch_makes_no_step(demo_data, tmp_path,
                                                                                     monkeypatch, amp):
    monkeypatch.setattr(pretrain_cass, "cass_loss", nan_between(6, 8))  # 3 bad steps in epoch 2
    out = pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "a", "--epochs", "2",
                                                                "--amp", amp)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [40, 16] and math.isfinite(log[1]["loss"])
    if amp == "fp16":  # the stop below is the guard's alone, whatever the half precision
        return
    monkeypatch.setattr(pretrain_cass, "cass_loss", nan_between(6))
    with pytest.raises(UserError, match="every step of epoch 2 had a non-finite loss"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "b", "--epochs", "3",
                                                              "--amp", amp, "--save-minutes", "0")))
    state = checkpoint.load(tmp_path / "b" / "last.pt", kind="resume")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["vit"]["model"].values() if v.is_floating_point())


def test_full_disk_is_detected_before_training(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
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
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "r", "--epochs", "3",
                                                              "--save-minutes", "0")))
    assert checkpoint.load(tmp_path / "r" / "last.pt", kind="resume")["epoch"] == 1
    assert [p.name for p in (tmp_path / "r").glob(".*.tmp")] == []


def test_last_pt_is_written_by_time_by_epoch_count_and_always_after_the_last_epoch(demo_data, tmp_path, monkeypatch,
                                                                                  capsys):
    real, saved = checkpoint.save, []
    monkeypatch.setattr(checkpoint, "save", lambda record, path: saved.append((path.name, record["epoch"]))
                        or real(record, path))
    for run, extra, epochs in (("time", [], [3]), ("every", ["--save-every", "2"], [2, 3]),
                               ("each", ["--save-minutes", "0"], [1, 2, 3])):
        saved.clear()
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / run, "--epochs", "3", *extra)))
        assert [epoch for name, epoch in saved if name == "last.pt"] == epochs, run
    assert re.search(r"saved \S+last\.pt \(epoch 3\) in \d+\.\d s", capsys.readouterr().out)  # the save's time


def test_ctrl_c_finishes_and_saves_the_epoch_under_way_and_twice_stops_at_once(demo_data, tmp_path, monkeypatch):
    real, handler = pretrain_cass.train_one_epoch, signal.getsignal(signal.SIGINT)

    def ctrl_c(times: int):
        def epoch(*a, **k):
            if a[-1] == 1:  # as the second epoch starts; a second Ctrl-C raises KeyboardInterrupt here
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        return epoch

    for times, extra, kept in ((1, [], 2), (2, ["--save-minutes", "0"], 1), (2, [], 0)):
        monkeypatch.setattr(pretrain_cass, "train_one_epoch", ctrl_c(times))
        out = tmp_path / f"{times}-{len(extra)}"
        with pytest.raises(SystemExit) as stop:
            pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, out, "--epochs", "3", *extra)))
        assert stop.value.code == 130 and saved_epoch(out / "last.pt") == kept, (times, extra)
        assert len(read_log(out)) == (2 if times == 1 else 1)  # each finished epoch's line is kept
    assert signal.getsignal(signal.SIGINT) is handler  # given back


def test_ctrl_c_in_a_terminal_with_loader_workers_saves_and_stops_cleanly(demo_data, tmp_path):
    """A terminal sends SIGINT to the whole process group: the loader workers must not die of it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_cass.py"),
                             *cass_args(demo_data, tmp_path / "run", "--epochs", "200", "--knn-every", "0"),
                             "--workers", "2", "--cache-dir", str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "log.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "stopped: continue with --resume" in output and saved_epoch(tmp_path / "run" / "last.pt") >= 1


def test_unwritable_output_folder_is_an_error_before_training(demo_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to output folder"):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(demo_data, tmp_path / "file" / "run", "--epochs", "1")))


def test_a_failed_start_fails_fast_and_leaves_no_folder(demo_data, tmp_path, monkeypatch):
    """A mistyped --data is named before any model or download; offline, the default ImageNet start stops in one
    line naming the ways round it, not after a minute of Hub retries; and no mistake leaves a run folder."""
    import finetune
    from plumbing import models

    for script, argv in ((pretrain_cass, ["--data", str(tmp_path / "typo"), "--out", str(tmp_path / "a")]),
                         (finetune, ["--arch", "resnet50", "--data", str(tmp_path / "typo"),
                                     "--out", str(tmp_path / "b")])):
        with pytest.raises(UserError, match="typo does not exist"):
            script.main(script.parse_args(argv))
    monkeypatch.setattr(models, "hub_answers", lambda arch: False)
    with pytest.raises(UserError, match="--cnn-weights FILE.*HF_HUB_OFFLINE=1.*--no-pretrained"):
        pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(tmp_path / "c")]))
    (tmp_path / "empty").mkdir()  # no images: found once the data is read, after the models
    with pytest.raises(UserError):
        pretrain_cass.main(pretrain_cass.parse_args(cass_args(tmp_path / "empty", tmp_path / "d", "--epochs", "1")))
    unlabelled = tmp_path / "unlabelled"
    for i in range(20):
        write_image(unlabelled / f"{i}.png", seed=i)
    with pytest.raises(UserError, match="has no labels"):
        finetune.main(finetune.parse_args(["--arch", "test_resnet", "--no-pretrained", "--data", str(unlabelled),
                                           "--img-size", "32", "--workers", "0", "--out", str(tmp_path / "e")]))
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_the_hub_is_not_asked_offline_or_behind_a_proxy(monkeypatch):
    from plumbing import models

    def refused(*a, **k):
        raise OSError("no route")

    monkeypatch.setattr(models.socket, "create_connection", refused)
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models.huggingface_hub, "try_to_load_from_cache", lambda repo, name, **k: None)
    assert models.hub_answers("resnet50") is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # off: the Hub is asked
    assert models.hub_answers("resnet50") is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_answers("resnet50") is True
    # weights already in the Hugging Face cache load without the Hub: no refusal
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cached = {("timm/resnet50.a1_in1k", "model.safetensors"): "/cache/model.safetensors"}
    monkeypatch.setattr(models.huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **k: cached.get((repo, name)))
    assert models.hub_answers("resnet50") is True and models.hub_answers("vit_base_patch16_384") is False
