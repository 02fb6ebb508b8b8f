"""Everything a GPU machine should confirm, in one command that writes one JSON file per part into --out:

1. cuda_tests.json: `pytest -v -m cuda tests/test_cuda.py`, each test's outcome as printed, and their counts;
2. bench_fp32.json, bench_bf16.json, bench_bf16_compile.json: bench.py at the paper's setting
   (ResNet-50 + ViT-B/16, 384 px, batch 16) in fp32, bf16 and bf16 + --compile (CASS alone): step
   images/s, model FLOP/s over the matmul peak measured in the same precision and run, CASS time /
   (DINO-ResNet-50 + DINO-ViT-B/16 time); the bf16 run also the loader and, on CUDA, the memory (tensors'
   peak, allocator's peak, whole device) with and without --grad-ckpt and the largest batch;
3. pretrain_ours.json: two epochs of pretrain_cass.py at the paper's setting on generated 384 px
   images with --workers 14: each epoch's images/s, data-wait share and peak memory;
   pretrain_theirs.json: the same run with the published notebook's data path and precision
   (every image decoded every epoch, fp32: --cache off --amp off), and its second-epoch images/s
   over ours in `ours_over_theirs`;
4. finetune.json: finetune.py on the pretraining run's vit.pt.

Each part runs in its own process with its own time budget (BUDGETS, 450 s in all: with the images
generated, the check ends within 8 minutes on one H100/H200 with 16 cores); a part that fails or
overruns is recorded in its JSON with the end of its output and what it had measured (bench.py writes
each figure as it is made, the stage scripts log every epoch, pytest prints each outcome), and the check
goes on. summary.json lists every part.

    python -m tools.device_check --out runs/device-check
    python -m tools.device_check --dry-run --out /tmp/dry   # tiny models on the CPU: tests/test_device_check.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from plumbing import flags
from plumbing.checkpoint import prepare_out_dir, read_log, write_json

ROOT = Path(__file__).resolve().parents[1]  # the parts run from the repository root
BUDGETS = {"cuda_tests": 100, "bench_fp32": 35, "bench_bf16": 95, "bench_bf16_compile": 110, "pretrain_ours": 40,
           "pretrain_theirs": 40, "finetune": 30}  # seconds, 450 in all: 30 s left for the images and start-up
PAPER = {"cnn": "resnet50", "vit": "vit_base_patch16_384", "img_size": 384, "bs": 16, "workers": 14,
         "per_class": 60, "steps": 5, "out_dim": 65536, "local_crops": 8, "device": "cuda"}
# 64 px, not 32: at 32 px (the tiny CNN's last feature map 1x1) its bf16 DINO step on the CPU turned
# non-finite in 6 of 40 identical seeded runs, and the dry run's test failed now and then; 0 of 40 at 64 px
DRY = {"cnn": "test_resnet", "vit": "test_vit", "img_size": 64, "bs": 4, "workers": 0, "per_class": 8,
       "steps": 1, "out_dim": 256, "local_crops": 2, "device": "cpu"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--out", default="runs/device-check", help="folder for the JSON files and every run")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, same parts and files")
    p.add_argument("--budget-scale", type=flags.positive_float, default=1.0,
                   help="multiplies every part's time budget (a slower machine)")
    return p.parse_args(argv)


def run_part(name: str, command: list[str], budget: float) -> tuple[dict, str]:
    """Run one part, unbuffered; its record (ok, seconds, budget and, on failure, the end of its output) and
    its whole output, also when stopped at its budget."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ok, output = done.returncode == 0, done.stdout + done.stderr
        error = None if ok else f"exit code {done.returncode}"
    except subprocess.TimeoutExpired as stop:  # the output up to the kill comes with it
        ok, error = False, f"over its budget of {budget:.0f} s"
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (stop.stdout, stop.stderr))
    record = {"part": name, "ok": ok, "seconds": round(time.perf_counter() - start, 1), "budget_s": budget,
              "command": command}
    return (record if ok else {**record, "error": error, "output_tail": output[-3000:]}), output


OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)


def pytest_outcomes(output: str) -> dict:
    """Each test's outcome from `pytest -v` output, as it was printed (so a run stopped part-way keeps the
    tests it finished), and their counts."""
    tests = {test: outcome.lower() for test, outcome in OUTCOME.findall(output)}
    counts = {kind: sum(o == kind for o in tests.values()) for kind in ("passed", "failed", "error", "skipped")}
    return {"counts": {"tests": len(tests), **counts}, "tests": tests}


def fresh(run: Path) -> Path:
    """An empty run folder: the stage scripts refuse to start a run where one is, and a rerun of the
    check into the same --out measures afresh."""
    shutil.rmtree(run, ignore_errors=True)
    return run


def main(args: argparse.Namespace) -> dict:
    out = prepare_out_dir(Path(args.out))
    s = DRY if args.dry_run else PAPER
    py = sys.executable
    budget = {name: seconds * args.budget_scale for name, seconds in BUDGETS.items()}
    records = {}

    def part(name: str, command: list[str], read) -> dict:
        """Runs a part and writes its JSON with what `read(output)` finds, also after a failure or a stop at
        its budget: bench.py writes each measurement as it is made, the stage scripts log every epoch."""
        record, output = run_part(name, command, budget[name])
        try:
            record.update(read(output))
        except (OSError, ValueError, KeyError) as failed:
            if record["ok"]:  # ran, but left no readable result
                record.update(ok=False, error=f"its result could not be read: {failed}")
        write_json(out / f"{name}.json", record)
        print(f"{name}: {'ok' if record['ok'] else record['error']} ({record['seconds']} s of {budget[name]:.0f})",
              flush=True)
        records[name] = record
        return record

    # fine-tuning inside the CUDA tests bootstraps 100 times (their --resamples): the budget is the GPU's
    part("cuda_tests", [py, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"],
         pytest_outcomes)
    model = ["--cnn", s["cnn"], "--vit", s["vit"], "--img-size", str(s["img_size"]), "--bs", str(s["bs"])]
    bench = [py, "-m", "tools.bench", *model, "--steps", str(s["steps"]), "--out-dim", str(s["out_dim"]),
             "--local-crops", str(s["local_crops"]), "--workers", str(s["workers"]), "--device", s["device"]]
    if args.dry_run:
        bench += ["--images", "4", "--image-px", "64", "48", "--loader-passes", "1", "--eval-images", "500"]
    # the dry run leaves out --compile: on the CPU, inductor spends minutes compiling C++ for tiny models
    compiled = [] if args.dry_run else ["--compile"]
    for name, extra in (("bench_fp32", ["--amp", "off", "--no-loader", "--no-memory"]),
                        ("bench_bf16", ["--amp", "bf16"]),
                        ("bench_bf16_compile",
                         ["--amp", "bf16", *compiled, "--no-loader", "--no-memory", "--no-dino"])):
        folder = out / name
        part(name, bench + extra + ["--out", str(folder)],
             lambda output, folder=folder: {"bench": json.loads((folder / "bench.json").read_text())})

    from plumbing.demo import make_demo_dataset  # only here: the parts above must not wait for the images
    data = make_demo_dataset(fresh(out / "data"), per_class=s["per_class"], size=max(s["img_size"], 40))
    pretrain = [py, "pretrain_cass.py", "--data", str(data), *model, "--no-pretrained", "--epochs", "2",
                "--knn-every", "0", "--workers", str(s["workers"]), "--device", s["device"],
                "--cache-dir", str(out / "cache")]
    for name, extra in (("pretrain_ours", []), ("pretrain_theirs", ["--cache", "off", "--amp", "off"])):
        run = fresh(out / name)
        part(name, pretrain + extra + ["--out", str(run)], lambda output, run=run: {"epochs": read_log(run)})
    if records["pretrain_ours"]["ok"] and records["pretrain_theirs"]["ok"]:
        ours, theirs = (records[n]["epochs"][-1]["images_per_s"] for n in ("pretrain_ours", "pretrain_theirs"))
        records["pretrain_theirs"]["ours_over_theirs"] = ours / theirs
        write_json(out / "pretrain_theirs.json", records["pretrain_theirs"])
    ft = fresh(out / "finetune")
    part("finetune", [py, "finetune.py", "--ckpt", str(out / "pretrain_ours" / "vit.pt"), "--epochs", "2",
                      "--bs", str(s["bs"]), "--workers", str(s["workers"]), "--device", s["device"],
                      "--resamples", "100", "--cache-dir", str(out / "cache"), "--out", str(ft)],
         lambda output: {"summary": json.loads((ft / "results.json").read_text())["summary"]}
         if (ft / "results.json").is_file() else {"epochs": read_log(ft)})

    summary = {"dry_run": args.dry_run, "settings": s, "parts": {n: r["ok"] for n, r in records.items()},
               "seconds": round(sum(r["seconds"] for r in records.values()), 1)}
    write_json(out / "summary.json", summary)
    print(f"{sum(summary['parts'].values())} of {len(records)} parts ok in {summary['seconds']} s; {out}/*.json")
    return summary


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
