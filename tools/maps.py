"""What a network looks at (Sec. 5.3.3, App. C.2-C.4): for a ViT, the class
token's attention in the last block (heads averaged; attention rollout with
--rollout), per image and averaged over --n test images as in Figs. 7-10; for a
CNN, the feature maps after the first convolution (Figs. 5-6) and Grad-CAM for
the predicted class. Two checkpoints (e.g. supervised and CASS) are also shown
side by side. Written to --out (figures.py draws them): <name>/<image path>,
each image beside its map, at the image's path relative to its data set with
.png added unless it ends so (blobs/0.png, checks/0.png, scans/a.jpg.png), so
that no two images share an overlay; <name>_mean.png, the map averaged over the
images listed in images.txt; <name>_first_conv.png (CNNs); compare.png, both
averages on one scale, when both checkpoints have one (a headless CNN has no
Grad-CAM).

    python -m tools.maps --ckpt runs/<run>/finetune-vit-frac1/model_seed0.pt --n 30 --out runs/maps
    python -m tools.maps --ckpt supervised/model_seed0.pt cass/model_seed0.pt --n 30 --out runs/maps
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plumbing import checkpoint
from evaluation import figures
from plumbing import flags
from plumbing import runtime as rt
from data import DataIndex, index_data
from errors import UserError
from plumbing.models import from_checkpoint, is_transformer, normalise, rebuild_arch
from plumbing.pixels import AUTO, ImageDataset
from plumbing.splits import select


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of a (B, h, w) batch min-max scaled into [0, 1] (all zeros if flat)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


@torch.no_grad()
def vit_attention(model: nn.Module, x: torch.Tensor, rollout: bool = False) -> torch.Tensor:
    """(B, gh, gw) class-token attention over the patches, in [0, 1].
    Attention weights are recomputed from each block's own q and k (timm's
    fused kernel never materialises them). Rollout (Abnar & Zuidema 2020)
    multiplies the head-averaged attention of every block, residual included."""
    if not hasattr(model, "blocks") or getattr(model, "num_prefix_tokens", 0) < 1:
        raise UserError(f"attention maps need a ViT-style model with a class token, not {type(model).__name__}")
    inputs = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for blk in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for blk, tokens in zip(model.blocks, inputs):
        attn = blk.attn
        b, n, _ = tokens.shape
        q, k, _ = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1))  # (B, N, N)
    if rollout:
        eye = torch.eye(weights[0].shape[-1], device=x.device)
        joint = eye
        for a in weights:
            a = 0.5 * a + 0.5 * eye
            joint = (a / a.sum(-1, keepdim=True)) @ joint
        cls = joint[:, 0]
    else:
        cls = weights[-1][:, 0]
    gh, gw = (s // p for s, p in zip(x.shape[-2:], model.patch_embed.patch_size))
    return unit_range(cls[:, model.num_prefix_tokens:].reshape(len(x), gh, gw))


def grad_cam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w) Grad-CAM (Selvaraju et al. 2017) of the last feature map for
    each image's predicted class, in [0, 1]."""
    with torch.enable_grad():
        feats = model.forward_features(x).detach().requires_grad_()
        logits = model.forward_head(feats)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    cam = F.relu((feats.grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1))
    return unit_range(cam.detach())


@torch.no_grad()
def first_conv_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) output of the network's first convolution, each channel in [0, 1]."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UserError("the model has no convolution layer")
    found = []
    hook = conv.register_forward_hook(lambda m, i, o: found.append(o))
    try:
        model(x)
    finally:
        hook.remove()
    out = found[0]
    return unit_range(out.flatten(0, 1)).view_as(out)


def draw_images(index: DataIndex, ids: list[int], n: int, seed: int) -> list[int]:
    """`n` of `ids` drawn at random (seeded), as App. C.4 does; for single-label
    data each class gets its share of the draw (largest remainders), so the
    maps follow the split's class distribution."""
    if len(ids) <= n:
        return sorted(ids)
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids)
    if not index.labelled or index.multilabel:
        return sorted(rng.choice(ids, n, replace=False).tolist())
    labels = index.targets[ids]
    share = n * np.bincount(labels, minlength=len(index.classes)) / len(ids)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share)[: n - quota.sum()]] += 1  # the largest remainders get the leftover images
    return sorted(x for c, q in enumerate(quota) for x in rng.choice(ids[labels == c], q, replace=False).tolist())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", nargs="+", required=True, help="one checkpoint, or two to compare side by side")
    p.add_argument("--images", help="a folder of images (default: the first checkpoint's test split)")
    p.add_argument("--n", type=flags.positive_int, default=30,
                   help="images drawn at random to map and average (App. C.4: 30; ISIC 100)")
    p.add_argument("--seed", type=flags.non_negative_int, default=0, help="seed of the random draw")
    p.add_argument("--rollout", action="store_true", help="attention rollout instead of the last block's attention")
    p.add_argument("--out", default="runs/maps", help="folder for the PNG files")
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="workers for checking the images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def map_checkpoint(ckpt: dict, name: str, title: str, index, ids: list[int], args, out: Path,
                   device) -> tuple[str, np.ndarray] | None:
    """Write one checkpoint's per-image overlays and averaged heat map, files named by `name`, titles by `title`;
    return (what the map shows, the (h, w) average), None for a CNN without a head."""
    model = from_checkpoint(ckpt).to(device).eval()
    dataset = ImageDataset(index.root, *index.part(ids), ckpt["img_size"], intensity=ckpt.get("intensity", AUTO))
    raw = torch.stack([dataset[i][0] for i in range(len(ids))]).to(device)
    x = normalise(raw, ckpt["mean"], ckpt["std"])
    images = raw.permute(0, 2, 3, 1).cpu().numpy()
    if is_transformer(rebuild_arch(ckpt)):
        kind = "attention rollout" if args.rollout else "class-token attention"
        maps = vit_attention(model, x, args.rollout)
    else:
        channels = first_conv_maps(model, x[:1])[0].cpu().numpy()
        figures.channel_figure(images[0], channels[:16], f"{title}: {dataset.paths[0]}\nafter the first convolution, "
                               f"the first {min(16, len(channels))} of {len(channels)} channels",
                               out / f"{name}_first_conv.png")
        if ckpt["num_classes"] == 0:
            print(f"{title}: no classifier head (a DINO backbone), so no Grad-CAM; first-conv maps only")
            return None
        kind, maps = "Grad-CAM of the predicted class", grad_cam(model, x)
    for path, image, m in zip(dataset.paths, images, maps.cpu().numpy()):
        # the image's own relative path: files of one name in two folders, or a.jpg beside a.png, stay apart
        overlay = path if path.lower().endswith(".png") else path + ".png"
        figures.overlay_figure(image, m, kind, f"{title}: {path}", out / name / overlay)
    average = unit_range(maps.mean(0, keepdim=True))[0].cpu().numpy()
    figures.heatmap_figure({title: (kind, average)}, f"mean over the {len(ids)} images of images.txt",
                           out / f"{name}_mean.png")
    return kind, average


def main(args: argparse.Namespace) -> dict[str, np.ndarray]:
    if len(args.ckpt) > 2:
        raise UserError("pass one checkpoint, or two to compare")
    ckpts = [checkpoint.load(p, kind="model") for p in args.ckpt]
    device = rt.pick_device(args.device)
    index = index_data(args.images or ckpts[0]["data"], workers=args.workers)
    ids = list(range(len(index.paths)))
    if not args.images:
        if not ckpts[0].get("splits"):
            raise UserError(f"{args.ckpt[0]} carries no split; pass --images FOLDER to choose the images")
        ids = select(index, ckpts[0]["splits"])["test"] or ids
    ids = draw_images(index, ids, args.n, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.txt").write_text("".join(index.paths[i] + "\n" for i in ids))  # what the averages are of
    names = [f"{i}_{Path(p).parent.name}_{Path(p).stem}" for i, p in enumerate(args.ckpt)]
    # titles name the run folder too: a fine-tuned checkpoint's own folder (finetune-vit-frac1) is alike in every run
    titles = dict(zip(names, (f"{i}: {Path(*Path(p).resolve().parts[-3:]).as_posix()}"
                              for i, p in enumerate(args.ckpt))))
    drawn = {name: found for name, c in zip(names, ckpts)
             if (found := map_checkpoint(c, name, titles[name], index, ids, args, out, device))}
    if len(drawn) == 2:
        figures.heatmap_figure({titles[name]: found for name, found in drawn.items()},
                               f"mean over the same {len(ids)} images (images.txt)", out / "compare.png")
    print(f"maps of {len(ids)} images written to {out}")
    return {name: average for name, (_, average) in drawn.items()}


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
