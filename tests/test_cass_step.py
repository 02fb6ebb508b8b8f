"""The CASS step as a specification: its loss, updates, schedule, collapse
signals, precision and resume state, and what each ablation switch changes.
Built from the script's own pieces on a fixed batch, no run folder needed."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN
from torchvision.transforms import v2

from plumbing import checkpoint
import pretrain_cass
from plumbing import runtime
from tools.bench import Batches
from conftest import TINY
from method.anticollapse import variance_hinge
from losses import cass_loss
from plumbing.models import normalise
from plumbing.pixels import gaussian_blur, train_augment

CPU = torch.device("cpu")


def setup(*flags, steps: int = 1, seed: int = 0):
    """Arms built as main() builds them, a loader of `steps` copies of one batch of 8 images, a scaler."""
    cfg = pretrain_cass.parse_args(["--data", "-", *TINY, "--epochs", "4", *flags])
    torch.manual_seed(seed)
    arms = [pretrain_cass.build_arm("cnn", cfg.cnn, None, cfg, CPU),
            pretrain_cass.build_arm("vit", cfg.vit, None, cfg, CPU)]
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return cfg, arms, Batches((x, None), steps), x


def outputs(arms, x):
    """Both arms' logits on x, as the step computes them (train mode), without touching the arms."""
    with torch.no_grad():
        return [copy.deepcopy(arm.model).train()(normalise(x, arm.mean, arm.std)) for arm in arms]


def test_step_loss_is_eq1_on_the_batch_and_both_arms_and_schedules_move():
    cfg, arms, loader, x = setup()
    r, t = outputs(arms, x)
    before = [copy.deepcopy(arm.model.state_dict()) for arm in arms]
    stats = pretrain_cass.train_one_epoch(arms, loader, runtime.grad_scaler(CPU, None), cfg, CPU, None, 0)
    expected = (2 - 2 * F.cosine_similarity(r, t, dim=1)).mean()
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5)
    for arm, old in zip(arms, before):
        assert any(not torch.equal(v, old[k]) for k, v in arm.model.state_dict().items()), arm.name
        # one batch stepped the cosine once (T_max 16, eta_min 1e-6, App. C.5.3)
        assert arm.opt.param_groups[0]["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi / 16)) / 2)
    signals = pretrain_cass.collapse_signals(r, t)
    assert stats["cnn_std"] == pytest.approx(signals["cnn_std"].item(), rel=1e-5)
    assert stats["cos"] == pytest.approx(F.cosine_similarity(r, t, dim=1).mean().item(), rel=1e-5)
    assert stats["images"] == 8 and stats["healthy_std"] == pytest.approx(1000 ** -0.5)


def test_collapse_signals_by_hand():
    same = torch.ones(4, 9)  # every image to one direction: no spread
    signals = pretrain_cass.collapse_signals(same, same)
    assert signals["cnn_std"] == 0 and signals["cos"] == pytest.approx(1.0)
    spread = torch.randn(2000, 100, generator=torch.Generator().manual_seed(0))
    signals = pretrain_cass.collapse_signals(spread, -spread)
    assert signals["vit_std"].item() == pytest.approx(0.1, rel=0.05)  # 1 / sqrt(D) for random directions
    assert signals["cos"] == pytest.approx(-1.0)
    assert pretrain_cass.is_collapsed(0.001, 0.002, 0.95, 0.1) and not pretrain_cass.is_collapsed(0.001, 0.002, 0.5, 0.1)


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_the_models_in_half_and_the_loss_in_float32(monkeypatch, amp, dtype):
    cfg, arms, loader, _ = setup("--amp", amp)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype
        return hook

    for arm in arms:
        arm.model.register_forward_hook(record(arm.name))

    def recording_loss(r, t):
        loss = cass_loss(r, t)
        seen["loss_inputs"], seen["loss"] = (r.dtype, t.dtype), loss.dtype
        return loss

    monkeypatch.setattr(pretrain_cass, "cass_loss", recording_loss)
    scaler = runtime.grad_scaler(CPU, runtime.amp_dtype(amp, CPU))
    stats = pretrain_cass.train_one_epoch(arms, loader, scaler, cfg, CPU, runtime.amp_dtype(amp, CPU), 0)
    assert seen == {"cnn": dtype, "vit": dtype, "loss_inputs": (torch.float32, torch.float32),
                    "loss": torch.float32}
    assert scaler.is_enabled() == (amp == "fp16") and math.isfinite(stats["loss"])


@pytest.mark.parametrize("flags", [[], ["--anti-collapse", "predictor", "--predictor-dim", "8"]])
def test_resume_record_restores_every_part_and_the_next_epoch_is_identical(tmp_path, flags):
    """The unit under every resume: what last.pt keeps of each arm (with --anti-collapse predictor, the
    predictors too, whose state moves the next epoch's weights) is all the next epoch depends on."""
    cfg, arms, loader, _ = setup("--swa-start", "1", *flags, steps=2)
    scaler = runtime.grad_scaler(CPU, None)

    def epoch(arms, e):
        runtime.seed_everything(cfg.seed * 100_003 + e)
        pretrain_cass.train_one_epoch(arms, loader, scaler, cfg, CPU, None, e)
        for arm in arms:
            arm.swa.update(arm.model, e)

    epoch(arms, 0)
    parts = {**{arm.name: arm.resumable() for arm in arms}, "scaler": scaler}
    checkpoint.save(checkpoint.resume_record("cass", 1, vars(cfg), {"train": []}, parts), tmp_path / "last.pt")
    state = checkpoint.load(tmp_path / "last.pt", kind="resume")
    assert set(state) == {"format", "kind", "method", "epoch", "args", "splits", "cnn", "vit", "scaler"}
    assert set(state["cnn"]) == {"model", "opt", "sched", "swa", "predictor"}
    assert (state["cnn"]["predictor"] is None) == (not flags)

    _, fresh, _, _ = setup("--swa-start", "1", *flags, steps=2, seed=123)  # other initial weights
    checkpoint.restore({**{arm.name: arm.resumable() for arm in fresh}, "scaler": scaler}, state)
    epoch(arms, 1)
    epoch(fresh, 1)
    for a, b in zip(arms, fresh):
        for module in ("model", "predictor"):
            if getattr(a, module) is None:
                continue
            ours, theirs = getattr(a, module).state_dict(), getattr(b, module).state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), (a.name, module)
        assert a.sched.last_epoch == b.sched.last_epoch == 4 and a.swa.count == b.swa.count == 2
        assert a.opt.state_dict()["state"][0]["step"] == b.opt.state_dict()["state"][0]["step"]


def test_each_ablation_switch_changes_what_it_names():
    def lr_after(cfg, arms, loader):
        pretrain_cass.train_one_epoch(arms, loader, runtime.grad_scaler(CPU, None), cfg, CPU, None, 0)
        return arms[0].opt.param_groups[0]["lr"]

    cfg, arms, loader, x = setup("--head-act", "softmax")  # Table 11
    r, t = outputs(arms, x)
    stats = pretrain_cass.train_one_epoch(arms, loader, runtime.grad_scaler(CPU, None), cfg, CPU, None, 0)
    assert stats["loss"] == pytest.approx(cass_loss(r.softmax(1), t.softmax(1)).item(), rel=1e-5)
    assert stats["loss"] != pytest.approx(cass_loss(r, t).item(), rel=1e-3)

    _, arms, _, _ = setup("--cnn-opt", "sgd")  # Table 10: SGD on the CNN arm only
    assert type(arms[0].opt) is torch.optim.SGD and arms[0].opt.defaults["momentum"] == 0.9
    assert type(arms[1].opt) is torch.optim.Adam

    by_batch = lr_after(*setup(steps=2)[:3])
    by_epoch = lr_after(*setup("--sched-step", "epoch", steps=2)[:3])
    cosine = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * k / 16)) / 2 for k in (1, 2)]
    assert (by_epoch, by_batch) == (pytest.approx(cosine[0]), pytest.approx(cosine[1]))

    cfg, arms, _, _ = setup("--t-max", "4", "--eta-min", "0.0001", "--lr", "0.01")
    assert (arms[1].sched.T_max, arms[1].sched.eta_min, arms[1].sched.base_lrs) == (4, 1e-4, [0.01])

    assert setup("--no-swa")[1][0].swa is None
    assert setup("--swa-start", "2")[1][0].swa.start_epoch == 1 and setup()[1][0].swa.start_epoch == 3

    assert setup()[1][0].mean == pytest.approx([0.5] * 3)  # what test_resnet's weights expect
    assert setup("--norm", "imagenet")[1][0].mean == pytest.approx(IMAGENET_DEFAULT_MEAN)

    _, arms, _, _ = setup("--cnn", "test_vit")  # a Transformer-Transformer pair
    assert arms[0].arch == "test_vit" and type(arms[0].model) is type(arms[1].model)

    assert all(arm.model.grad_checkpointing for arm in setup("--grad-ckpt")[1])
    assert not any(arm.model.grad_checkpointing for arm in setup()[1])


def test_table_9_augmentations_add_blur_and_solarize():
    def kinds(variant):  # each transform's class, a Lambda's function
        ops = train_augment(variant).transforms
        ops = [*ops, *(inner for op in ops for inner in getattr(op, "transforms", []))]
        return {op.lambd.__name__ if isinstance(op, v2.Lambda) else type(op).__name__ for op in ops}

    assert not {"gaussian_blur", "RandomSolarize"} & kinds("paper")
    assert {"gaussian_blur", "RandomSolarize"} <= kinds("blur+solarize")
    assert "gaussian_blur" in kinds("blur") and "RandomSolarize" not in kinds("blur")
    bright = v2.functional.to_pil_image(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    solarized = []
    for seed in range(20):
        torch.manual_seed(seed)
        solarized.append(np.asarray(train_augment("solarize")(bright)).max() < 128)
    assert any(solarized) and not all(solarized)  # p = 0.2: 255 - 200 = 55 on some draws


def test_the_blur_is_pillows_gaussian_at_a_seeded_sigma():
    checks = v2.functional.to_pil_image(((torch.arange(64)[:, None] // 4 + torch.arange(64) // 4) % 2 * 255)
                                        .to(torch.uint8).expand(3, 64, 64))

    def blurred(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        return np.asarray(gaussian_blur(checks), dtype=float)
    def sigma(seed: int) -> float:  # the draw gaussian_blur makes after manual_seed(seed)
        torch.manual_seed(seed)
        return float(torch.empty(()).uniform_(0.1, 2.0))
    sigmas = [sigma(seed) for seed in range(10)]
    assert 0.1 <= min(sigmas) < max(sigmas) <= 2.0
    wide = int(np.argmax(sigmas))  # a sigma above 1.5: a visible blur
    assert np.array_equal(blurred(wide), np.asarray(checks.filter(ImageFilter.GaussianBlur(radius=sigmas[wide])),
                                                    dtype=float))
    assert np.array_equal(blurred(wide), blurred(wide)) and not np.array_equal(blurred(wide), blurred(wide + 1))
    assert blurred(wide).std() < 0.9 * np.asarray(checks, dtype=float).std()


def test_variance_hinge_by_hand():
    z = torch.tensor([[3.0, 4.0], [4.0, -3.0], [0.0, 5.0]])  # norms 5: normalised rows (0.6, 0.8), (0.8, -0.6), (0, 1)
    u = torch.tensor([[0.6, 0.8], [0.8, -0.6], [0.0, 1.0]]) * 2 ** 0.5  # scaled by sqrt(D)
    assert variance_hinge(z, eps=0.0).item() == pytest.approx(torch.relu(1 - u.std(0)).mean().item(), rel=1e-6)
    one_direction = torch.ones(4, 5) * torch.tensor([1.0, 2, 3, 4])[:, None]
    assert variance_hinge(one_direction).item() == pytest.approx(1 - 1e-2, abs=1e-3)  # sqrt(eps) is all the spread
    assert variance_hinge(torch.randn(4000, 50)).item() < 0.02  # random directions: no penalty


def test_anti_collapse_objectives_by_hand():
    r, t = torch.randn(6, 1000), torch.randn(6, 1000)
    cfg, arms, _, _ = setup("--anti-collapse", "variance", "--variance-weight", "0.5")
    expected = cass_loss(r, t) + 0.5 * (variance_hinge(r) + variance_hinge(t))
    assert pretrain_cass.objective(r, t, arms, cfg).item() == pytest.approx(expected.item(), rel=1e-6)
    cfg, arms, _, _ = setup("--anti-collapse", "predictor", "--predictor-dim", "8")
    r.requires_grad_(True)
    loss = pretrain_cass.objective(r, t.requires_grad_(True), arms, cfg)
    expected = 0.5 * (cass_loss(arms[0].predictor(r), t) + cass_loss(arms[1].predictor(t), r))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()  # stop-gradient: each arm's output gets gradient only through its own predictor
    grad_r = r.grad.clone()
    r.grad, t.grad = None, None
    (0.5 * cass_loss(arms[0].predictor(r), t.detach())).backward()
    assert torch.allclose(r.grad, grad_r)
    assert pretrain_cass.objective(r, t, arms, setup()[0]).item() == pytest.approx(cass_loss(r, t).item())
    cfg, arms, _, _ = setup("--anti-collapse", "predictor+variance", "--predictor-dim", "8", "--variance-weight", "2")
    both = 0.5 * (cass_loss(arms[0].predictor(r), t) + cass_loss(arms[1].predictor(t), r)) \
        + 2 * (variance_hinge(r) + variance_hinge(t))
    assert pretrain_cass.objective(r, t, arms, cfg).item() == pytest.approx(both.item(), rel=1e-6)


def test_vit_lr_sets_the_transformer_arm_alone():
    cfg, arms, _, _ = setup("--lr", "1e-3", "--vit-lr", "1e-4")
    assert [arm.opt.param_groups[0]["lr"] for arm in arms] == [1e-3, 1e-4]
    cfg, arms, _, _ = setup("--lr", "1e-3")  # default: the paper's one learning rate for both
    assert [arm.opt.param_groups[0]["lr"] for arm in arms] == [1e-3, 1e-3]


def test_predictor_is_trained_and_kept_in_last_pt_but_not_in_the_backbone(tmp_path):
    cfg, arms, loader, _ = setup("--anti-collapse", "predictor", "--predictor-dim", "8")
    before = copy.deepcopy(arms[0].predictor.state_dict())
    pretrain_cass.train_one_epoch(arms, loader, runtime.grad_scaler(CPU, None), cfg, CPU, None, 0)
    assert not torch.equal(before["0.weight"], arms[0].predictor.state_dict()["0.weight"])
    parts = {**{arm.name: arm.resumable() for arm in arms}, "scaler": runtime.grad_scaler(CPU, None)}
    record = checkpoint.resume_record("cass", 1, vars(cfg), {}, parts)
    assert set(record["cnn"]["predictor"]) == set(arms[0].predictor.state_dict())
    assert not any(k.startswith("predictor") for k in checkpoint.plain_state_dict(arms[0].model))
