"""GPU memory of a CASS step estimated without a GPU (tools/bench.py's part 4 where CUDA is absent): the
training state measured on the real models, plus what autograd keeps of both arms' forward passes, counted on
fake tensors, plus an assumed CUDA context; and the largest batch each card size would hold. docs/speed.md has
the table at the paper's setting:

    python -c "from tools.memory import memory_estimate as m; print(m('resnet50', 'vit_base_patch16_384', 384, 16))"
"""
from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import pretrain_cass
from plumbing import runtime as rt


CARDS_GB = (12, 16, 24, 48, 80)
CONTEXT_GIB = 1.0  # assumed: the CUDA context and cuDNN's workspaces, which no CPU measurement sees


def saved_activation_gib(model: nn.Module, bs: int, size: int, dtype: torch.dtype | None) -> float:
    """GiB that autograd keeps from the forward pass for the backward, autocast's weight copies included, of
    a batch of `bs` images: counted on fake tensors (torch's FakeTensorMode), so no memory or compute is
    spent. CPU autocast keeps nearly what CUDA's does; an estimate, not a GPU measurement."""
    seen, total = set(), [0]

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in seen and not isinstance(t, nn.Parameter):
            seen.add(storage._cdata)
            total[0] += storage.nbytes()
        return t

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(bs, 3, size, size)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), rt.autocast(torch.device("cpu"), dtype):
            model(x)
    return total[0] / 2**30


def memory_estimate(cnn: str, vit: str, img_size: int, bs: int) -> dict:
    """Estimated GPU memory of a CASS step on the configured models at --img-size, in bf16 and fp32, with and
    without --grad-ckpt: the training state (weights, gradients, Adam's two moments, the SWA average:
    measured on the real models) plus both arms' saved activations per image (fake tensors, above), plus
    CONTEXT_GIB; and the largest batch each card size of CARDS_GB would hold (10 % kept free for the
    allocator's fragments). Marked `estimated`: not yet measured on a GPU."""
    cpu, out = torch.device("cpu"), {"estimated": True, "context_gib_assumed": CONTEXT_GIB}
    for ckpt in (False, True):
        cfg = pretrain_cass.parse_args(["--data", "-", "--cnn", cnn, "--vit", vit, "--img-size", str(img_size),
                                        "--no-pretrained"] + (["--grad-ckpt"] if ckpt else []))
        arms = [pretrain_cass.build_arm(name, arch, None, cfg, cpu) for name, arch in (("cnn", cfg.cnn),
                                                                                      ("vit", cfg.vit))]
        params = sum(p.numel() for arm in arms for p in arm.model.parameters())
        state = params * 4 * (4 + bool(cfg.swa)) / 2**30  # fp32 weights, gradients, two moments, the average
        out["state_gib"] = state
        for amp, dtype in (("bf16", torch.bfloat16), ("off", None)):
            per_image = sum(saved_activation_gib(arm.model, bs, img_size, dtype) for arm in arms) / bs
            key = f"amp_{amp}_ckpt_{ckpt}"
            out[f"activation_gib_per_image_{key}"] = per_image
            out[f"gib_at_bs{bs}_{key}"] = CONTEXT_GIB + state + per_image * bs
            for gb in CARDS_GB:
                usable = 0.9 * gb * 1e9 / 2**30 - CONTEXT_GIB - state
                out[f"largest_batch_{gb}gb_{key}"] = max(0, int(usable / per_image))
    return out
