"""The command line every script shares: the entry point that turns a user's
mistake into one line and exit code 2, checked number types, and the flags of
the stage scripts in --help's four groups (the paper's settings, its
ablations, ours, running)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from errors import UserError
from plumbing.pixels import AUGMENTATIONS, AUTO, IntensityFlag

# flags that say where and how fast a run executes (device, processes, cache, compilation, saves), not the
# experiment it makes: a run's identity (fine-tuning's run.json, the report's experiments) leaves them out, and a
# resumed run may change them (results may then differ in their last bits: another device, compiled kernels)
EXECUTION = ("workers", "threads", "device", "cache", "cache_dir", "compile", "grad_ckpt", "save_every", "save_minutes")
EXECUTION_FLAGS = ", ".join(f"--{name.replace('_', '-')}" for name in EXECUTION)  # as a user types them


def run_cli(main: Callable[[argparse.Namespace], object],
            parse_args: Callable[[list[str] | None], argparse.Namespace]) -> None:
    """The entry point of every script: a UserError becomes one line on stderr and exit code 2."""
    try:
        main(parse_args(None))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _checked(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "0 or more")
positive_float = _checked(float, lambda v: v > 0, "positive")
non_negative_float = _checked(float, lambda v: v >= 0, "0 or more")
fraction = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each flag's default, but not "None": a flag without one says in its help what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def program() -> str:
    """How --help names the running script: a stage script by its file name, a module of a folder as it is run
    (`python -m tools.predict`)."""
    path, root = Path(sys.argv[0]).resolve(), Path(__file__).resolve().parents[1]
    if path.suffix == ".py" and path.is_relative_to(root) and path.parent != root:
        return "python -m " + ".".join(path.relative_to(root).with_suffix("").parts)
    return path.name


def new_parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=program(), description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


@dataclass
class ArgGroups:
    """A stage script's flags as --help shows them: by where each default comes from."""
    paper: argparse._ArgumentGroup  # each default names its section of the paper
    ablations: argparse._ArgumentGroup  # what the paper's ablation tables vary
    ours: argparse._ArgumentGroup
    running: argparse._ArgumentGroup  # the data, the run folder, the seed, and where and how the run executes


def arg_groups(p: argparse.ArgumentParser) -> ArgGroups:
    return ArgGroups(p.add_argument_group("the paper's settings"), p.add_argument_group("the paper's ablations"),
                     p.add_argument_group("ours, beyond the paper"), p.add_argument_group("running"))


def add_common_args(g: ArgGroups, *, epochs: int, epochs_source: str, out_default: str, img_size: int | None = 384,
                    img_size_help: str = "square input size (App. C.5.2)", aug: bool = True, seed: bool = True) -> None:
    """Flags with the same meaning in pretraining and fine-tuning (`aug`, `seed`: where they mean something;
    `out_default`: where the run goes without --out)."""
    g.running.add_argument("--data", help="class folders, train/val/test folders, or a labels CSV (docs/data.md)")
    g.running.add_argument("--out", help=f"run folder (default: {out_default})")
    g.paper.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs ({epochs_source})")
    g.paper.add_argument("--bs", type=positive_int, default=16, help="batch size (App. C.5.3: 16)")
    g.paper.add_argument("--img-size", type=positive_int, default=img_size, help=img_size_help)
    if aug:
        g.ablations.add_argument("--aug", choices=AUGMENTATIONS, default="paper",
                                 help="augmentations: App. C.5.2, or with Table 9's extra blur / solarize")
    g.ours.add_argument("--intensity", nargs="+", action=IntensityFlag, default=AUTO, metavar=("MODE", "LO HI"),
                        help="16-bit, float and DICOM pixels to 0..255: auto (DICOM: the file's VOI window, else "
                             "min-max), per-image min-max, the 0.5-99.5th percentiles, or a fixed window in the "
                             "image's units (DICOM: after rescale, e.g. HU); 8-bit images are unchanged "
                             "(docs/formats.md)")
    g.ours.add_argument("--norm", choices=("model", "imagenet"), default="model",
                        help="input normalisation: what each model's weights expect, or ImageNet "
                             "statistics for every model as in App. C.5.2")
    if seed:
        g.running.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    g.ours.add_argument("--group-col", metavar="COL",
                        help="labels CSV column naming each image's group (patient, lesion): a group is never "
                             "split across train/val/test; folder layouts read DIR/groups.csv (columns path, "
                             "group) instead")
    g.ours.add_argument("--duplicates", choices=("list", "together"), default="list",
                        help="images showing one picture twice (same pixels, or resized / recompressed) are "
                             "counted and listed in splits.json; together: each such set also goes into one split")
    g.running.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                           help="data-loading worker processes")
    g.running.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    g.running.add_argument("--threads", type=non_negative_int,
                           help="CPU threads of the training process (default: the cores left beside the loader "
                                "workers, at least 1; 0: PyTorch's own choice). Runs sharing a machine: docs/speed.md")
    g.running.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                           help="mixed precision: auto = bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU")
    g.running.add_argument("--cache", choices=("on", "off"), default="on",
                           help="decode and resize every image once into a memory-mapped cache (same pixels)")
    g.running.add_argument("--cache-dir", default="runs/cache", help="where image caches live")
    g.running.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                           help="torch.compile the models (slow start, faster steps)")
    g.running.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                           help="gradient checkpointing (timm): less GPU memory for some extra compute")


def add_pretraining_args(groups: ArgGroups) -> None:
    groups.running.add_argument("--demo", action="store_true", help="generate a small image set and default to "
                                "tiny models (no data, GPU or internet needed)")
    groups.running.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR, wherever it now "
                                "lies, from its last.pt with its own settings; only "
                                + EXECUTION_FLAGS + " may be given beside it")
    groups.running.add_argument("--save-minutes", type=non_negative_float, default=10.0,
                                help="write last.pt once this many minutes have passed since the last write (0: "
                                     "after every epoch); always after the last epoch and at Ctrl-C")
    groups.running.add_argument("--save-every", type=non_negative_int, default=0,
                                help="also write last.pt every N epochs (0: by time only)")
    groups.ours.add_argument("--knn-every", type=non_negative_int, default=10,
                             help="every N epochs, log the weighted kNN accuracy (k 20) of frozen features on the "
                                  "val split, for labelled single-label data (0: never)")


def stage_parser(doc: str, *, first: Callable[[argparse.ArgumentParser], None] | None = None,
                 pretraining: bool = False, **common) -> tuple[argparse.ArgumentParser, ArgGroups]:
    """A stage script's parser and its four groups, holding `first(parser)`'s flags (usage lists them first),
    the flags every stage shares (add_common_args with `common`) and, for `pretraining`, those of a pretraining
    run."""
    p = new_parser(doc)
    if first:
        first(p)
    g = arg_groups(p)
    add_common_args(g, **common)
    if pretraining:
        add_pretraining_args(g)
    return p, g


def parse_pretraining(p: argparse.ArgumentParser, argv: list[str] | None, demo_models: dict) -> argparse.Namespace:
    """The flags of a pretraining script. With --resume, `typed` also holds each flag the user typed
    (dest -> value, also when it equals the default), so that pretraining.run_settings can refuse those
    that would change the resumed run."""
    args = p.parse_args(argv)
    if args.demo:  # the demo's settings become defaults, so explicit flags still win
        from plumbing.demo import DEMO_SETTINGS  # only --demo needs it
        p.set_defaults(**DEMO_SETTINGS, **demo_models)
        args = p.parse_args(argv)
    if args.resume:  # parsed again over a namespace that has every flag already: argparse adds no default
        unset = object()
        given = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
        args = argparse.Namespace(**vars(args), typed={k: v for k, v in vars(given).items() if v is not unset})
    return args

