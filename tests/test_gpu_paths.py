"""What a review predicted the first GPU would show, checked on the CPU: the precision chosen for cards that only
emulate bf16, and the host synchronisations a CASS step makes (each one stalls the GPU's queue)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain_cass
from plumbing import loop, runtime
from conftest import TINY

# operators that hand a device value to the host: on CUDA each one waits for every kernel queued before it
SYNCING = {"aten.equal.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default"}


class Syncs(TorchDispatchMode):
    """Counts the syncing operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, dtype):
    # Turing (7.5: RTX 2080 Ti, Quadro RTX 8000) and Volta (7.0) report bf16 as supported, by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert runtime.amp_dtype("auto", torch.device("cuda", 0)) == dtype
    assert runtime.amp_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16  # asked for: given


@pytest.mark.parametrize("mode", ["none", "variance", "predictor", "predictor+variance"])
def test_the_cass_objective_never_waits_for_the_device(tmp_path, demo_data, mode):
    cfg = pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(tmp_path), *TINY,
                                    "--anti-collapse", mode, "--predictor-dim", "8"])
    arms = [pretrain_cass.build_arm(name, arch, None, cfg, torch.device("cpu"))
            for name, arch in (("cnn", cfg.cnn), ("vit", cfg.vit))]
    r, t = torch.randn(4, 1000, requires_grad=True), torch.randn(4, 1000)
    with Syncs() as syncs:
        loss = pretrain_cass.objective(r, t, arms, cfg)
        loss.backward()
        pretrain_cass.objective(t, t.clone(), arms, cfg)  # identical outputs: Alg. 1's noise, decided on the device
    assert syncs.found == []
    # the one sync a step keeps: the non-finite guard, which every process must answer alike
    with Syncs() as syncs:
        loop.loss_everywhere(loss)
    assert syncs.found == ["aten._local_scalar_dense.default"]


def test_the_guard_leaves_the_loss_as_it_was(monkeypatch):
    # torch.distributed's all-reduce writes into its tensor: two processes' sum must not become this one's loss
    monkeypatch.setattr(loop, "all_reduce_sum", lambda x: x.mul_(2))
    monkeypatch.setattr(loop, "world_size", lambda: 2)
    loss = torch.tensor(0.75, requires_grad=True) * 1.0
    guard = loop.NonFinite(None, epoch=0)
    assert not guard.skip(loss, step=0) and guard.loss == 0.75 and loss.item() == 0.75
