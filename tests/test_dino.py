import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from plumbing import checkpoint
import data
import finetune
import pretrain_cass
import pretrain_dino
from conftest import TIMING, interrupted_run, same_weights
from method.dino import (DINOHead, DINOLoss, MultiCropAugment, MultiCropNet, cancel_last_layer_grad, clip_gradients,
                         cosine_schedule, ema_update, local_size_for, param_groups)
from errors import UserError

TINY_DINO = ["--no-pretrained", "--img-size", "32", "--bs", "8", "--workers", "0", "--out-dim", "64",
             "--local-crops", "2"]


def test_dino_loss_by_hand_with_centering_over_two_calls():
    loss_fn = DINOLoss(out_dim=3, ncrops=3, epochs=5, warmup_teacher_temp=0.5, teacher_temp=0.5,
                       warmup_teacher_temp_epochs=0, student_temp=1.0, center_momentum=0.9)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # 2 global views, batch 1
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.0]])  # 3 views, batch 1

    def expected(center):
        q = [F.softmax((t[i] - center) / 0.5, dim=0) for i in range(2)]
        logp = [F.log_softmax(s[v], dim=0) for v in range(3)]
        pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), views differ
        return sum(-(q[a] * logp[b]).sum() for a, b in pairs) / 4

    first, entropy = loss_fn(s, t, epoch=0)
    assert first.item() == pytest.approx(expected(torch.zeros(3)).item(), rel=1e-6)
    q = F.softmax(t / 0.5, dim=1)
    assert entropy.item() == pytest.approx(-(q * q.log()).sum(1).mean().item(), rel=1e-6)
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))  # the loss itself leaves the centre alone
    loss_fn.update_center(t)
    center = 0.1 * t.mean(0)  # 0.9 * 0 + 0.1 * batch mean
    assert torch.allclose(loss_fn.center[0], center)
    second, _ = loss_fn(s, t, epoch=1)
    assert second.item() == pytest.approx(expected(center).item(), rel=1e-6)
    loss_fn.update_center(t)
    assert torch.allclose(loss_fn.center[0], 0.9 * center + 0.1 * t.mean(0))


def test_row_constant_student_gives_ln_k():
    k = 50
    loss_fn = DINOLoss(k, ncrops=4, epochs=1)
    teacher = torch.randn(2 * 3, k)
    student = torch.full((4 * 3, k), 7.0)  # every row constant: uniform student
    assert loss_fn(student, teacher, 0)[0].item() == pytest.approx(math.log(k), rel=1e-5)


def test_loss_averages_the_18_pairs_of_2_plus_8_crops():
    torch.manual_seed(0)
    k, b, ncrops = 16, 3, 10
    loss_fn = DINOLoss(k, ncrops, epochs=1, warmup_teacher_temp_epochs=0, teacher_temp=0.07)
    s, t = torch.randn(ncrops * b, k), torch.randn(2 * b, k)
    q = F.softmax(t / 0.07, dim=-1).chunk(2)
    logp = F.log_softmax(s / 0.1, dim=-1).chunk(ncrops)
    terms = [(-(q[a] * logp[v]).sum(-1)).mean() for a in range(2) for v in range(ncrops) if v != a]
    assert len(terms) == 18
    assert loss_fn(s, t, 0)[0].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_teacher_temperature_warms_up_and_is_clipped_to_the_run():
    temps = DINOLoss(4, 2, epochs=40).teacher_temps
    assert temps == pytest.approx(list(np.linspace(0.04, 0.07, 30)) + [0.07] * 10)
    short = DINOLoss(4, 2, epochs=3).teacher_temps
    assert short == pytest.approx([0.04, 0.055, 0.07])


def test_head_last_layer_rows_have_unit_norm():
    head = DINOHead(8, out_dim=32, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight.mul_(5.0)  # the direction matters, not the scale
    x = torch.randn(3, 8)
    z = F.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ F.normalize(head.last_layer.weight, dim=1).T, atol=1e-6)
    assert head(x).abs().max() <= 1.0 + 1e-5  # unit vectors against unit rows


def test_teacher_follows_the_ema_formula_exactly_and_gets_no_gradient():
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = nn.Linear(4, 3)
    for p in teacher.parameters():
        p.requires_grad = False
    before = [p.clone() for p in teacher.parameters()]
    student(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    ema_update(teacher, student, 0.9)
    for old, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.equal(t, old * 0.9 + s * (1 - 0.9))


def test_last_layer_frozen_in_epoch_0_only_and_clipping_per_parameter():
    net = MultiCropNet(nn.Linear(4, 6), DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4))
    net([torch.randn(2, 4)]).sum().backward()
    cancel_last_layer_grad(net, epoch=1, freeze_epochs=1)
    assert net.head.last_layer.weight.grad is not None
    cancel_last_layer_grad(net, epoch=0, freeze_epochs=1)
    assert net.head.last_layer.weight.grad is None
    for p in net.parameters():
        if p.grad is not None:
            p.grad.fill_(10.0)
    small = net.head.mlp[0].bias
    small.grad = torch.full_like(small, 0.01)
    clip_gradients(net, 3.0)
    assert net.backbone.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert torch.equal(small.grad, torch.full_like(small, 0.01))  # under the cap: untouched
    groups = param_groups(net)
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])


def test_multicrop_views_and_network_grouping():
    aug = MultiCropAugment(64, 32, 3, (0.14, 1.0), (0.05, 0.14))
    views = aug(Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)))
    assert [v.size for v in views] == [(64, 64)] * 2 + [(32, 32)] * 3
    views = [torch.from_numpy(np.array(v)).permute(2, 0, 1) for v in views]
    calls = []
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = MultiCropNet(backbone, DINOHead(3, 7, 8, 4))([v[None].float() for v in views])
    assert out.shape == (5, 7) and calls == [2, 3]  # one backbone call per resolution
    assert local_size_for(224) == 96 and local_size_for(384) == 160


def test_cosine_schedule_warmup_and_end_points():
    s = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=5, warmup_epochs=2)
    assert len(s) == 20 and s[0] == 0.0 and s[9] == pytest.approx(0.9)
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 9 / 10)))
    m = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=3)
    assert m[0] == pytest.approx(0.996) and all(np.diff(m) > 0)


def test_collapse_kinds():
    assert pretrain_dino.collapse_kind(math.log(1000), math.log(1000) - 0.01, 1000) == "uniform"
    assert pretrain_dino.collapse_kind(0.05, 0.01, 1000) == "one-dimension"
    assert pretrain_dino.collapse_kind(3.0, 1.0, 1000) is None  # student still learning from the teacher


@pytest.mark.parametrize("arch,role", [("test_resnet", "cnn"), ("test_vit", "vit")])
def test_one_epoch_run_saves_a_teacher_backbone_that_fine_tunes(demo_data, tmp_path, arch, role):
    out = pretrain_dino.main(pretrain_dino.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "dino"), "--arch", arch, "--epochs", "1", *TINY_DINO,
         "--knn-every", "1", "--cache-dir", str(tmp_path / "cache")]))
    # crops come from a cache of aspect-kept copies, the kNN monitor's square images from one of their own
    tags = {p.name.split("-")[2] for p in (tmp_path / "cache").glob("data-*")}
    assert tags == {"fit64", "square32", f"fingerprinted{data.CHECK_VERSION}"}
    ckpt = torch.load(out / f"{role}.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "dino" and ckpt["arch"] == arch and ckpt["role"] == role and ckpt["num_classes"] == 0
    state = checkpoint.load(out / "last.pt", kind="resume")
    teacher_backbone = {k.removeprefix("backbone."): v for k, v in state["teacher"].items()
                        if k.startswith("backbone.")}
    assert teacher_backbone.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(teacher_backbone[k], ckpt["state_dict"][k]) for k in teacher_backbone)
    # epoch 0 froze the last layer: the student's never moved, so the teacher's EMA equals it
    assert torch.allclose(state["student"]["head.last_layer.weight"], state["teacher"]["head.last_layer.weight"])
    assert not torch.equal(state["student"]["head.mlp.0.weight"], state["teacher"]["head.mlp.0.weight"])
    log = json.loads((out / "log.jsonl").read_text())
    assert log["ln_k"] == pytest.approx(math.log(64)) and log["teacher_temp"] == 0.04 and 0 <= log["knn_teacher"] <= 1
    assert {"loss", "lr", "momentum", "teacher_entropy", "kl", "collapse", "images_per_s"} <= set(log)
    results = finetune.main(finetune.parse_args(["--ckpt", str(out / f"{role}.pt"), "--epochs", "1", "--workers", "0",
                                                 "--resamples", "100", "--out", str(tmp_path / "ft")]))
    assert results["method"] == "dino" and 0 <= results["summary"]["macro_f1"]["mean"] <= 1


def test_dino_resume_matches_an_uninterrupted_run(demo_data, tmp_path, capsys):
    """The one end-to-end resume test of pretrain_dino.py: Ctrl-C as epoch 2 starts, then --resume."""
    def args(out):
        return pretrain_dino.parse_args(["--data", str(demo_data), "--out", str(out), "--arch", "test_resnet",
                                         "--epochs", "2", *TINY_DINO])

    full = pretrain_dino.main(args(tmp_path / "full"))
    interrupted_run(pretrain_dino, args(tmp_path / "part"), epoch=1)  # exit code 130
    assert f"continue with --resume {tmp_path / 'part'}" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "part" / "last.pt", kind="resume")["epoch"] == 1
    with pytest.raises(UserError, match="holds a dino run, not a cass one"):
        pretrain_cass.main(pretrain_cass.parse_args(["--resume", str(tmp_path / "part")]))
    pretrain_dino.main(pretrain_dino.parse_args(["--resume", str(tmp_path / "part"), "--workers", "0"]))
    assert same_weights(full / "cnn.pt", tmp_path / "part" / "cnn.pt")

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log(tmp_path / "part")] == [1, 2] and log(tmp_path / "part") == log(full)


def test_recipe_defaults_follow_the_architecture():
    cnn = pretrain_dino.with_recipe(pretrain_dino.parse_args(["--data", "x", "--arch", "test_resnet"]))
    vit = pretrain_dino.with_recipe(pretrain_dino.parse_args(["--data", "x", "--arch", "test_vit", "--lr", "1e-4"]))
    assert (cnn.optimizer, cnn.lr, cnn.global_scale, cnn.local_size) == ("sgd", 0.03, [0.14, 1.0], 160)
    assert (vit.optimizer, vit.lr, vit.weight_decay_end, vit.local_scale) == ("adamw", 1e-4, 0.4, [0.05, 0.4])
    assert (cnn.drop_path, vit.drop_path) == (0.0, 0.1)  # the official ViT student's stochastic depth


def test_only_the_student_has_stochastic_depth():
    cfg = pretrain_dino.with_recipe(pretrain_dino.parse_args(["--data", "x", *TINY_DINO, "--arch", "test_vit"]))
    student, teacher, _, _ = pretrain_dino.build(cfg, torch.device("cpu"))
    rates = [[blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0
              for blk in net.backbone.blocks] for net in (student, teacher)]
    assert max(rates[0]) == pytest.approx(0.1) and max(rates[1]) == 0.0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())  # same start


def test_a_non_finite_teacher_batch_never_reaches_the_centre(demo_data, tmp_path, monkeypatch):
    """fp16 skips the step; the centre must skip it too, or every later batch is NaN as well.
    One epoch (fp16 is slow on the CPU): the two batches after the bad one show the centre stayed finite."""
    real, calls = MultiCropNet.forward, [0]

    def forward(self, views):
        out = real(self, views)
        if not torch.is_grad_enabled():  # the teacher's forward
            calls[0] += 1
            out = out * float("nan") if calls[0] == 3 else out
        return out

    monkeypatch.setattr(MultiCropNet, "forward", forward)
    # a narrow head: half-precision matrix products crawl on the CPU, and the centre's width is --out-dim's
    monkeypatch.setattr(pretrain_dino, "DINOHead", functools.partial(DINOHead, hidden_dim=64, bottleneck_dim=32))
    out = pretrain_dino.main(pretrain_dino.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "r"), "--arch", "test_resnet", "--epochs", "1",
         "--amp", "fp16", *TINY_DINO]))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [32] and math.isfinite(log[0]["loss"])  # 5 batches of 8, one skipped
    assert torch.isfinite(checkpoint.load(out / "last.pt", kind="resume")["loss"]["center"]).all()
