import torch
from torch import nn

from swa import SWA, default_start


def test_default_start_is_last_quarter():
    assert default_start(100) == 75
    assert default_start(4) == 3
    assert default_start(1) == 0


def test_swa_averages_epoch_end_weights_from_start_and_refreshes_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    swa = SWA(model, start_epoch=1)
    snapshots = []
    for epoch in range(3):
        with torch.no_grad():
            model[0].weight.copy_(torch.full((3, 3), float(epoch + 1)))
            model[0].bias.copy_(torch.tensor([epoch, 0.0, -epoch]))
        swa.update(model, epoch)
        if epoch >= 1:
            snapshots.append({k: v.clone() for k, v in model[0].state_dict().items()})
    assert swa.count == 2
    data = [torch.randn(8, 3) for _ in range(4)]
    averaged = swa.finalize(model, iter(data))
    expected_w = (snapshots[0]["weight"] + snapshots[1]["weight"]) / 2  # epochs 2 and 3 -> 2.5
    assert torch.allclose(averaged[0].weight, expected_w)
    assert torch.allclose(averaged[0].bias, torch.tensor([1.5, 0.0, -1.5]))
    # BatchNorm statistics are those of the averaged layer's outputs on the data
    # (momentum None: the plain mean over batches of each batch's statistics)
    with torch.no_grad():
        feats = [averaged[0](x) for x in data]
    assert torch.allclose(averaged[1].running_mean, torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-5)
    assert torch.allclose(averaged[1].running_var, torch.stack([f.var(0) for f in feats]).mean(0), rtol=1e-4)
    assert averaged[1].running_mean.abs().sum() > 0  # not the reset value


def test_swa_without_updates_returns_the_model_and_a_vit_reads_no_batches():
    model = nn.Linear(2, 2)
    swa = SWA(model, start_epoch=5)
    swa.update(model, 0)
    assert swa.finalize(model, iter([])) is model
    no_bn = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    swa = SWA(no_bn, start_epoch=0)
    swa.update(no_bn, 0)

    def never():
        raise AssertionError("batches were read")
        yield

    out = swa.finalize(no_bn, never())
    assert torch.allclose(out[0].weight, no_bn[0].weight)


def test_swa_state_round_trips():
    model = nn.Linear(2, 2)
    a = SWA(model, 0)
    a.update(model, 0)
    b = SWA(nn.Linear(2, 2), 0)
    b.load_state_dict(a.state_dict())
    assert b.count == 1
    assert torch.equal(b.average.module.weight, model.weight)
