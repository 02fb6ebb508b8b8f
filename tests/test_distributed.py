"""torchrun with the gloo backend on the CPU: 2 processes at batch B match 1 process at batch 2B."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain_dino


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# test_convnext has LayerNorm, not BatchNorm: PyTorch's SyncBatchNorm runs on GPUs only
PAIR = ["--cnn", "test_convnext", "--vit", "test_vit", "--img-size", "32", "--no-pretrained", "--workers", "0",
        "--device", "cpu", "--epochs", "2", "--cache", "off"]


def run(script, *argv, procs=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, str(ROOT / script), *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_twice_the_batch(demo_data, tmp_path):
    run("pretrain_cass.py", "--data", str(demo_data), "--out", str(tmp_path / "one"), "--bs", "8", *PAIR)
    two = run("pretrain_cass.py", "--data", str(demo_data), "--out", str(tmp_path / "two"), "--bs", "4", *PAIR,
              procs=2)
    one_log, two_log = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["epoch"] for r in two_log] == [1, 2]  # written once, by rank 0
    assert [r["images"] for r in two_log] == [r["images"] for r in one_log]
    for a, b in zip(one_log, two_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for role in ("cnn", "vit"):
        a = torch.load(tmp_path / "one" / f"{role}.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "two" / f"{role}.pt", weights_only=True)["state_dict"]
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), role
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())
    assert two.stdout.count("epoch 1:") == 1  # only rank 0 prints


def test_dino_and_finetune_run_under_torchrun(demo_data, tmp_path):
    run("pretrain_dino.py", "--data", str(demo_data), "--out", str(tmp_path / "dino"), "--arch", "test_vit",
        "--img-size", "32", "--bs", "4", "--epochs", "1", "--out-dim", "64", "--local-crops", "2",
        "--no-pretrained", "--workers", "0", "--device", "cpu", procs=2)
    state = torch.load(tmp_path / "dino" / "last.pt", weights_only=True)
    assert state["loss"]["center"].abs().sum() > 0
    # the lr follows the global batch: 2 processes at batch 4 log the lr of 1 process at batch 8
    pretrain_dino.main(pretrain_dino.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "dino1"), "--arch", "test_vit", "--img-size", "32",
         "--bs", "8", "--epochs", "1", "--out-dim", "64", "--local-crops", "2", "--no-pretrained", "--workers", "0",
         "--device", "cpu"]))
    assert read_log(tmp_path / "dino")[0]["lr"] == pytest.approx(read_log(tmp_path / "dino1")[0]["lr"], rel=1e-9)
    run("finetune.py", "--ckpt", str(tmp_path / "dino" / "vit.pt"), "--epochs", "2", "--workers", "0",
        "--resamples", "100", "--device", "cpu", "--out", str(tmp_path / "ft"), procs=2)
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["method"] == "dino" and len(results["runs"]) == 1
    assert len((tmp_path / "ft" / "log.jsonl").read_text().splitlines()) == results["runs"][0]["epochs_run"]
    assert torch.load(tmp_path / "ft" / "model_seed0.pt", weights_only=True)["num_classes"] == 4


def test_anti_collapse_runs_under_torchrun(demo_data, tmp_path):
    run("pretrain_cass.py", "--data", str(demo_data), "--out", str(tmp_path / "ac"), "--bs", "4", *PAIR,
        "--anti-collapse", "predictor", "--predictor-dim", "16", procs=2)
    log = read_log(tmp_path / "ac")
    assert [r["epoch"] for r in log] == [1, 2] and all(0 < r["eq1_loss"] <= 4 for r in log)
    assert torch.load(tmp_path / "ac" / "cnn.pt", weights_only=True)["anti_collapse"] == "predictor"
