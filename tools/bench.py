"""Speed benchmark, measured in one run on whatever device it finds:

1. loader images/s: per-sample decode + resize of large JPEGs vs the decode-once cache; per-image
   milliseconds of each augmentation pipeline in one process (the paper's, --aug blur, DINO's multi-crop), and
   of one Gaussian blur by Pillow (ours) and by torchvision's 39 x 39 kernel (before);
2. pretraining step images/s: CASS (both arms) vs DINO (2 + 8 crops) for each
   architecture, and CASS time / (DINO-CNN + DINO-ViT time) for the same images
   (the paper's Table 2 claim as one number);
3. achieved model FLOP/s (torch.utils.flop_counter) over the matmul peak measured here;
4. memory with and without AMP and gradient checkpointing, and the largest batch: measured on CUDA, estimated
   elsewhere (fake tensors, `tools/memory.py`), also for GPUs of 12 to 80 GB;
5. evaluation: seconds of metrics.evaluate (every metric and its 1,000-resample intervals) on one seed of
   --eval-images test images of 8 classes (ISIC-2019's size by default);
6. with --side-by-side: seconds per epoch of a pretrain_cass.py run alone and of
   each of two runs side by side on the CPU, with the default threads and with
   PyTorch's own (--threads 0).

    python -m tools.bench                       # tiny models, a few minutes on 2 CPU cores
    python -m tools.bench --cnn resnet50 --vit vit_base_patch16_384 --img-size 384 --bs 16   # the paper's setting
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from plumbing import flags
import pretrain_cass
import pretrain_dino
from plumbing import runtime as rt
from plumbing.checkpoint import prepare_out_dir, write_json
from data import index_data, keyed_path
from losses import cass_loss
from evaluation.metrics import evaluate
from plumbing.models import normalise
from method.dino import MultiCropAugment
from tools.memory import memory_estimate
from plumbing.pixels import ImageDataset, gaussian_blur, open_cache, train_augment, train_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--cnn", default="test_resnet", help="timm CNN (paper: resnet50)")
    p.add_argument("--vit", default="test_vit", help="timm Transformer (paper: vit_base_patch16_384)")
    p.add_argument("--img-size", type=flags.positive_int, default=64, help="input size (paper: 384)")
    p.add_argument("--bs", type=flags.positive_int, default=16, help="batch size (paper: 16)")
    p.add_argument("--steps", type=flags.positive_int, default=5, help="timed steps per model setting")
    p.add_argument("--images", type=flags.positive_int, default=48, help="generated JPEGs for the loader test")
    p.add_argument("--image-px", type=flags.positive_int, nargs=2, default=[1000, 800], help="their width and height")
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="loader workers, both paths")
    p.add_argument("--loader-passes", type=flags.positive_int, default=5,
                   help="timed passes over the images, each path")
    p.add_argument("--out-dim", type=flags.positive_int, default=65536, help="DINO head output dimension")
    p.add_argument("--local-crops", type=flags.non_negative_int, default=8, help="DINO local crops")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    p.add_argument("--compile", action="store_true", help="time the steps of torch.compile'd models")
    p.add_argument("--loader", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the loader and the augmentations (1.); --no-loader: the steps only, e.g. in a "
                        "run per precision")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory and the largest batch (4.): measured on CUDA, estimated elsewhere")
    p.add_argument("--dino", action=argparse.BooleanOptionalAction, default=True,
                   help="time DINO's steps and the CASS / DINO ratio (2.); --no-dino: CASS alone, e.g. compiled "
                        "(DINO adds four graphs to compile)")
    p.add_argument("--side-by-side", type=flags.non_negative_int, default=0, metavar="IMAGES",
                   help="time pretrain_cass.py alone and two at once on this many generated 64 px images (0: skip)")
    p.add_argument("--eval-images", type=flags.non_negative_int, default=5000,
                   help="test images of the evaluation timing (5.; 0: skip)")
    p.add_argument("--report-images", type=flags.non_negative_int, default=0,
                   help="test images of each prediction file of a generated paper-size report.py run (0: skip)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and the generated images")
    return p.parse_args(argv)


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """Photo-like JPEGs (smooth colour fields plus grain) in two class folders."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(n):
        path = folder / f"c{i % 2}" / f"img_{i:04d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6, 3)
        img = 127 + 80 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def loader_speed(args, folder: Path) -> dict:
    """images/s over --loader-passes passes (after a warm-up pass), same augmentations and workers."""
    index = index_data(folder, workers=args.workers, check_images=False)
    start = time.perf_counter()
    cache = open_cache(keyed_path(Path(args.out) / "cache", index.root, index.paths, f"square{args.img_size}"),
                       index.root, index.paths, "square", args.img_size, args.workers)
    build = time.perf_counter() - start

    def pass_rate(source) -> float:
        loader = train_loader(ImageDataset(index.root, index.paths, index.targets, args.img_size,
                                           train_augment(), source), args.bs, seed=0,
                              workers=args.workers)
        for _ in loader:  # warm-up: worker start, file system cache
            pass
        start = time.perf_counter()
        for _ in range(args.loader_passes):
            for _ in loader:
                pass
        return args.loader_passes * len(index.paths) / (time.perf_counter() - start)

    plain, cached = pass_rate(None), pass_rate(cache)
    return {"loader_plain_ips": plain, "loader_cached_ips": cached, "loader_speedup": cached / plain,
            "cache_build_s": build}


def augment_speed(args, images: int = 12) -> dict:
    """Milliseconds per image in this process (no workers) at --img-size, over generated photographs-like RGB
    images (smooth gradients and noise): each pipeline once per image after a warm-up pass over the same images."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, args.img_size)
    pictures = [Image.fromarray(np.clip(ramp[None, :, None] * rng.random(3) + rng.normal(0, 20, (args.img_size,
                args.img_size, 3)), 0, 255).astype(np.uint8)) for _ in range(images)]
    old_blur = v2.GaussianBlur(2 * int(0.05 * args.img_size) + 1, sigma=(0.1, 2.0))  # before: an exact kernel

    def per_image(transform) -> float:
        for picture in pictures:  # the warm-up: each random branch (p = 0.3) has run, its first-call costs paid
            transform(picture)
        start = time.perf_counter()
        for picture in pictures:
            transform(picture)
        return 1000 * (time.perf_counter() - start) / len(pictures)

    found = {"aug_paper_ms": per_image(train_augment("paper")), "aug_blur_ms": per_image(train_augment("blur")),
             "dino_multicrop_ms": per_image(MultiCropAugment(args.img_size, 96, args.local_crops, (0.4, 1.0),
                                                             (0.05, 0.4))),
             "blur_pillow_ms": per_image(gaussian_blur), "blur_torchvision_ms": per_image(old_blur)}
    return {**found, "aug_blur_over_paper": found["aug_blur_ms"] / found["aug_paper_ms"],
            "blur_torchvision_over_pillow": found["blur_torchvision_ms"] / found["blur_pillow_ms"]}


def evaluation_speed(images: int, classes: int = 8, resamples: int = 1000) -> dict:
    """Seconds of one seed's metrics.evaluate on generated logits (500 val and `images` test images)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, classes, images)
    logits = rng.normal(size=(images, classes)) + 2 * np.eye(classes)[targets]
    start = time.perf_counter()
    evaluate(logits[:500], targets[:500], logits, targets, False, "macro_f1", resamples=resamples)
    return {"evaluate_s": time.perf_counter() - start}


def report_speed(images: int, out: Path, classes: int = 8, seeds: int = 5, resamples: int = 1000) -> dict:
    """Seconds of report.py over a generated paper-size set of runs, written as finetune.py writes them: one data
    set, CASS, DINO and supervised rows of a CNN and a ViT, label fractions 1, 10 and 100 %, `seeds` seeds each
    with its labelled files (70 % of the data is train) and a prediction file of `images` test images of
    `classes` classes (results.json names its source and each file's SHA-256)."""
    import hashlib  # only this part needs them
    import itertools
    import finetune
    from evaluation import predictions
    from evaluation import report
    from data import DataIndex
    from evaluation.metrics import headline_score, probabilities
    rng, data, runs = np.random.default_rng(0), "/data/paper-size", out / "report-runs"
    names = [f"class{k}" for k in range(classes)]
    targets = rng.integers(0, classes, images)
    test = DataIndex(Path(data), Path(data), "class folders", [f"{names[t]}/test{i:05d}.png"
                                                               for i, t in enumerate(targets)], targets, names)
    train = [f"{names[i % classes]}/train{i:06d}.png" for i in range(images * 7 // 2)]
    for method, arch, frac in itertools.product(("cass", "dino", "supervised"), ("resnet50", "vit_base_patch16_384"),
                                                (0.01, 0.1, 1.0)):
        role = "vit" if arch.startswith("vit") else "cnn"
        folder = runs / f"{method}-{arch}" / f"finetune-{role}-frac{frac}"
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = str(runs / f"{method}-{arch}" / f"{role}.pt")
        source = {"arch": arch, "pretrained": True} if method == "supervised" else \
            {"path": ckpt, "sha256": hashlib.sha256(ckpt.encode()).hexdigest()}
        config = finetune.parse_args([*(["--arch", arch, "--data", data] if method == "supervised" else
                                        ["--ckpt", ckpt]), "--frac", str(frac), "--seeds", *map(str, range(seeds))])
        done = []
        for seed in range(seeds):
            probs = probabilities(rng.normal(size=(images, classes)) + 2 * np.eye(classes)[targets], False)
            digest = predictions.write(folder / f"predictions_seed{seed}.csv", test, list(range(images)), probs)
            labelled = np.random.default_rng([seed, round(100 * frac)]).permutation(train)[:round(frac * len(train))]
            done.append({"seed": seed, "test": {"macro_f1": headline_score("macro_f1", targets, probs.argmax(1),
                                                                           False)},
                         "labelled_files": labelled.tolist(),
                         "predictions": {"file": f"predictions_seed{seed}.csv", "sha256": digest}})
        write_json(folder / "results.json", {
            "method": method, "arch": arch, "role": role, "protocol": "finetune", "frac": frac, "metric": "macro_f1",
            "classes": names, "multilabel": False, "runs": done, "config": vars(config), "source": config.ckpt or arch,
            "source_id": source, "resolved": {"img_size": 384, "lr": finetune.LR["finetune"], "data": data}})
    start = time.perf_counter()
    report.main(report.parse_args([str(runs), "--out", str(out / "report"), "--resamples", str(resamples)]))
    return {"report_s": time.perf_counter() - start}


class Batches:
    """A stand-in loader: `steps` copies of one batch, with the sampler hook the epoch loops call."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def images(n: int, size: int, device) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)


def cass_speed(args, device, dtype, grad_ckpt: bool = False, bs: int | None = None, compiled: bool = False) -> dict:
    """The real CASS epoch function on a synthetic batch: an untimed warm-up epoch (which also
    compiles, with --compile), then a timed one."""
    bs = bs or args.bs
    cfg = pretrain_cass.parse_args(["--data", "-", "--cnn", args.cnn, "--vit", args.vit, "--img-size",
                                    str(args.img_size), "--bs", str(bs), "--no-pretrained", "--epochs", "2"]
                                   + (["--grad-ckpt"] if grad_ckpt else []) + (["--compile"] if compiled else []))
    arms = [pretrain_cass.build_arm("cnn", args.cnn, None, cfg, device),
            pretrain_cass.build_arm("vit", args.vit, None, cfg, device)]
    loader, scaler = Batches((images(bs, args.img_size, device), None), args.steps), rt.grad_scaler(device, dtype)
    for epoch in (0, 1):
        stats = pretrain_cass.train_one_epoch(arms, loader, scaler, cfg, device, dtype, epoch)
    return {"ips": stats["images_per_s"], "arms": arms}


def dino_speed(args, arch: str, device, dtype, compiled: bool = False) -> float:
    cfg = pretrain_dino.with_recipe(pretrain_dino.parse_args(
        ["--data", "-", "--arch", arch, "--img-size", str(args.img_size), "--bs", str(args.bs), "--no-pretrained",
         "--epochs", "2", "--out-dim", str(args.out_dim), "--local-crops", str(args.local_crops)]))
    student, teacher, mean, std = pretrain_dino.build(cfg, device)
    views = [images(args.bs, args.img_size, device) for _ in range(2)] + \
        [images(args.bs, cfg.local_size, device) for _ in range(args.local_crops)]
    opt, loss_fn = pretrain_dino.optimizer_and_loss(cfg, student, device)
    loader = Batches((views, None), args.steps)
    step = torch.compile if compiled else (lambda model: model)  # as pretrain_dino.main does
    run = pretrain_dino.Training(student, teacher, step(student), step(teacher), loss_fn, opt,
                                 rt.grad_scaler(device, dtype),
                                 pretrain_dino.schedules(cfg, len(loader), 1), mean, std)
    for epoch in (0, 1):
        stats = pretrain_dino.train_one_epoch(run, loader, cfg, device, dtype, epoch)
    return stats["images_per_s"]


def cass_flops_per_image(arms, args, device, dtype) -> float:
    """Forward + backward FLOPs of one CASS step (both arms), per image."""
    x = images(args.bs, args.img_size, device)
    with FlopCounterMode(display=False) as counter:
        with rt.autocast(device, dtype):
            r = arms[0].model(normalise(x, arms[0].mean, arms[0].std))
            t = arms[1].model(normalise(x, arms[1].mean, arms[1].std))
        cass_loss(r, t).backward()
    return counter.get_total_flops() / args.bs


def matmul_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul in the training precision, measured here."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def cuda_memory(args, device, measured: Callable[[dict], None]) -> None:
    """GiB at batch --bs with and without AMP and gradient checkpointing, and the largest batch with AMP, each
    passed to `measured` as it is made (a stopped run keeps them). Three figures a setting: `peak_gib_*`, the
    tensors' peak (torch.cuda.max_memory_allocated); `reserved_gib_*`, the caching allocator's peak, which is
    what must fit; `used_gib_*`, the whole device in use at the end (mem_get_info), CUDA context and cuDNN
    workspaces included: a card needs at least that. Nothing else is alive meanwhile."""
    for amp in ("off", "auto"):
        for ckpt in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cass_speed(args, device, rt.amp_dtype(amp, device), grad_ckpt=ckpt)
            free, total = torch.cuda.mem_get_info(device)
            measured({f"peak_gib_amp_{amp}_ckpt_{ckpt}": torch.cuda.max_memory_allocated() / 2**30,
                      f"reserved_gib_amp_{amp}_ckpt_{ckpt}": torch.cuda.max_memory_reserved() / 2**30,
                      f"used_gib_amp_{amp}_ckpt_{ckpt}": (total - free) / 2**30})
    bs = args.bs
    while bs <= 4096:
        try:
            torch.cuda.empty_cache()
            cass_speed(args, device, rt.amp_dtype("auto", device), bs=bs)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError only from torch 2.5
            break
        measured({"largest_batch_amp": bs})
        bs *= 2


def side_by_side(args, folder: Path) -> dict:
    """Seconds of the second epoch (cache built, workers warm) of CPU runs of
    pretrain_cass.py: one alone, then two started together (their mean), with
    the default --threads and with PyTorch's own thread count."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = {}
    for threads in ("default", "0"):
        for n in (1, 2):
            outs = [Path(args.out) / "side-by-side" / f"threads-{threads}-{n}-{i}" for i in range(n)]
            procs = [subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve().parents[1] / "pretrain_cass.py"), "--data", str(folder),
                 "--cnn", args.cnn, "--vit", args.vit, "--no-pretrained", "--img-size", "48", "--bs", str(args.bs),
                 "--epochs", "2", "--knn-every", "0", "--device", "cpu", "--workers", str(args.workers),
                 "--cache-dir", str(Path(args.out) / "cache"), "--out", str(out)]
                + ([] if threads == "default" else ["--threads", threads]),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for out in outs]
            if any(p.wait() for p in procs):
                raise RuntimeError("a side-by-side pretraining run failed")
            seconds = [json.loads((out / "log.jsonl").read_text().splitlines()[-1])["seconds"] for out in outs]
            result[f"epoch_s_{'alone' if n == 1 else 'each_of_two'}_threads_{threads}"] = float(np.mean(seconds))
    return result


def main(args: argparse.Namespace) -> dict:
    out = prepare_out_dir(Path(args.out))
    device = rt.pick_device(args.device)
    dtype = rt.amp_dtype(args.amp, device)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(dtype or torch.float32), "config": vars(args)}

    def measured(values: dict) -> None:
        """Written at once: a run stopped part-way (device_check.py's time budgets) keeps what it measured."""
        result.update(values)
        write_json(out / "bench.json", result)

    if args.loader:
        measured(loader_speed(args, make_jpegs(out / "jpegs", args.images, tuple(args.image_px))))
        measured(augment_speed(args))
    cass = cass_speed(args, device, dtype, compiled=args.compile)
    flops = cass_flops_per_image(cass.pop("arms"), args, device, dtype)  # the models go: memory is measured alone
    peak = matmul_peak(device, dtype)
    measured({"cass_ips": cass["ips"], "cass_gflop_per_image": flops / 1e9,
              "achieved_tflops": flops * cass["ips"] / 1e12, "matmul_peak_tflops": peak / 1e12,
              "fraction_of_peak": flops * cass["ips"] / peak})
    if args.dino:
        dino_cnn = dino_speed(args, args.cnn, device, dtype, args.compile)
        measured({"dino_cnn_ips": dino_cnn})
        dino_vit = dino_speed(args, args.vit, device, dtype, args.compile)
        measured({"dino_vit_ips": dino_vit, "cass_dino_time_ratio": (1 / cass["ips"]) / (1 / dino_cnn + 1 / dino_vit)})
    if args.eval_images:
        measured(evaluation_speed(args.eval_images))
    if args.report_images:
        measured(report_speed(args.report_images, out))
    if args.memory and device.type == "cuda":
        cuda_memory(args, device, measured)
    elif args.memory:
        measured(memory_estimate(args.cnn, args.vit, args.img_size, args.bs))
    if args.side_by_side:
        measured(side_by_side(args, make_jpegs(out / "small-jpegs", args.side_by_side, (64, 64))))
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key != "config":
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"written to {out / 'bench.json'}")
    return result


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
