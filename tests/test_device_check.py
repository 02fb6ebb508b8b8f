"""The device check (device_check.py) dry-run on the CPU with tiny models, so that the command
docs/speed.md gives for a GPU machine never rots; and the per-epoch data-wait share it reads from
the pretraining log."""
import json
import sys
import time

import pytest
import torch

from tools import bench
from tools import device_check
import pretrain_cass
from plumbing import loop
from plumbing import runtime as rt

CPU = torch.device("cpu")


class SlowBatches(bench.Batches):
    """bench's stand-in loader, each batch `delay` seconds late, as from a loader that cannot keep up."""

    def __init__(self, batch, steps: int, delay: float):
        super().__init__(batch, steps)
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


def test_epoch_log_gives_the_share_of_the_epoch_spent_waiting_for_batches():
    cfg = pretrain_cass.parse_args(["--data", "-", "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32",
                                    "--bs", "4", "--no-pretrained", "--epochs", "1"])
    arms = [pretrain_cass.build_arm("cnn", cfg.cnn, None, cfg, CPU),
            pretrain_cass.build_arm("vit", cfg.vit, None, cfg, CPU)]
    x = bench.images(4, 32, CPU)
    waited = []
    for delay in (0.0, 0.3):
        stats = pretrain_cass.train_one_epoch(arms, SlowBatches((x, None), 3, delay), rt.grad_scaler(CPU, None),
                                              cfg, CPU, None, 0)
        assert "peak_mem_gb" not in stats  # CUDA only
        assert 0 <= stats["data_wait"] <= 1
        waited.append(stats["data_wait"] * stats["seconds"])
    # a list's next() costs microseconds; counting the steps' compute as waiting would cost far more
    assert waited[0] < 0.1 and 0.89 <= waited[1] < 1.5  # three sleeps of 0.3 s; the log rounds


def test_usage_text_shows_peak_memory_only_where_measured():
    assert loop.EpochUsage.text({"data_wait": 0.125}) == ", data wait 12%"
    assert loop.EpochUsage.text({"data_wait": 0.5, "peak_mem_gb": 12.34}) == ", data wait 50%, peak 12.3 GB"


@pytest.mark.slow
def test_dry_run_writes_every_part_as_json(tmp_path):
    """The GPU command of docs/speed.md with tiny models on the CPU: every part runs and is read back."""
    summary = device_check.main(device_check.parse_args(["--dry-run", "--out", str(tmp_path)]))
    read = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in device_check.BUDGETS}
    assert summary["parts"] == dict.fromkeys(device_check.BUDGETS, True), \
        {name: (r.get("error"), r.get("output_tail", "")[-600:]) for name, r in read.items() if not r["ok"]}
    assert all(r["seconds"] <= r["budget_s"] for r in read.values())
    counts = read["cuda_tests"]["counts"]
    assert counts["tests"] > 0 and counts["failed"] == counts["error"] == 0
    if not torch.cuda.is_available():
        assert counts["skipped"] == counts["tests"]
    for name in ("bench_fp32", "bench_bf16", "bench_bf16_compile"):
        assert read[name]["bench"]["fraction_of_peak"] > 0
        assert ("cass_dino_time_ratio" in read[name]["bench"]) == (name != "bench_bf16_compile")  # CASS alone
    assert read["bench_bf16"]["bench"]["loader_speedup"] > 0 and "loader_speedup" not in read["bench_fp32"]["bench"]
    for name in ("pretrain_ours", "pretrain_theirs"):
        assert [e["epoch"] for e in read[name]["epochs"]] == [1, 2]
        assert all(0 <= e["data_wait"] <= 1 for e in read[name]["epochs"])
    assert read["pretrain_theirs"]["ours_over_theirs"] > 0
    assert read["pretrain_theirs"]["command"][-4:-2] == ["--amp", "off"]
    assert 0 <= read["finetune"]["summary"]["macro_f1"]["mean"] <= 1


def test_a_failing_or_overrunning_part_is_recorded_with_what_it_printed_and_the_check_goes_on():
    failed, output = device_check.run_part("fails", [sys.executable, "-c", "print('why'); raise SystemExit(3)"], 30)
    assert (failed["ok"], failed["error"]) == (False, "exit code 3") and "why" in failed["output_tail"] == output
    script = "import time; print('tests/test_cuda.py::test_a PASSED'); time.sleep(30); print('never')"
    slow, output = device_check.run_part("slow", [sys.executable, "-c", script], 2)
    assert not slow["ok"] and slow["error"] == "over its budget of 2 s" and slow["seconds"] < 10
    assert device_check.pytest_outcomes(output) == {
        "counts": {"tests": 1, "passed": 1, "failed": 0, "error": 0, "skipped": 0},
        "tests": {"tests/test_cuda.py::test_a": "passed"}}  # printed before the kill: kept


def test_every_part_stopped_at_its_budget_still_leaves_its_json(tmp_path):
    """--budget-scale 0.005: each part is stopped within a second or so, and each JSON file is written."""
    summary = device_check.main(device_check.parse_args(["--dry-run", "--budget-scale", "0.005",
                                                         "--out", str(tmp_path)]))
    assert summary["parts"] == dict.fromkeys(device_check.BUDGETS, False)
    for name in device_check.BUDGETS:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["error"].startswith("over its budget"), name
