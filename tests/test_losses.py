import math

import pytest
import torch
import torch.nn.functional as F

from losses import cass_loss, class_weights, focal_loss


def test_cass_loss_matches_equation_1_by_hand():
    r = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 1.0], [4.0, 3.0]])
    # sample 1: orthogonal -> 2; sample 2: cos = 24/25 -> 2 - 48/25 = 0.08
    assert cass_loss(r, t).item() == pytest.approx((2.0 + 0.08) / 2, abs=1e-6)


def test_cass_loss_is_scale_invariant_and_float32_under_half_inputs():
    r, t = torch.randn(4, 10), torch.randn(4, 10)
    assert cass_loss(5 * r, t).item() == pytest.approx(cass_loss(r, t).item(), abs=1e-6)
    out = cass_loss(r.half(), t.bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identical_outputs_get_noise_finite_loss_and_nonzero_gradients(dtype):
    torch.manual_seed(0)
    base = torch.randn(4, 16)
    r = base.clone().to(dtype).requires_grad_()
    t = base.clone().to(dtype).requires_grad_()
    loss = cass_loss(r, t)
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item()) < 1e-5
    # without the Alg. 1 noise the gradient at r == t is zero up to rounding;
    # the noise makes it an order of magnitude larger than that rounding
    r0 = base.clone().requires_grad_()
    (2 - 2 * F.cosine_similarity(r0, base.clone(), dim=1)).mean().backward()
    rounding = r0.grad.abs().sum()
    assert r.grad.abs().sum() > 3 * rounding and t.grad.abs().sum() > 3 * rounding


def test_class_weights_schemes():
    assert class_weights([10, 50, 30]).tolist() == pytest.approx([0.2, 1.0, 0.6])
    assert class_weights([7, 7]).tolist() == [1.0, 1.0]
    assert class_weights([10, 30], "inverse").tolist() == pytest.approx([2.0, 40 / 60])
    assert class_weights([1, 2], "none") is None
    with pytest.raises(ValueError):
        class_weights([1, 2], "bogus")


def test_sigmoid_focal_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([0])
    p = torch.sigmoid(logits)[0]
    # class 0 positive: (1-p0)^2 * -log p0; class 1 negative: p1^2 * -log(1-p1); mean over the 2 classes
    expected = ((1 - p[0]) ** 2 * -torch.log(p[0]) + p[1] ** 2 * -torch.log(1 - p[1])) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    w = torch.tensor([0.2, 1.0])
    weighted = (0.2 * (1 - p[0]) ** 2 * -torch.log(p[0]) + 1.0 * p[1] ** 2 * -torch.log(1 - p[1])) / 2
    assert focal_loss(logits, target, weights=w).item() == pytest.approx(weighted.item(), rel=1e-5)
    assert focal_loss(logits, target, alpha=3.0).item() == pytest.approx(3 * expected.item(), rel=1e-5)


def test_sigmoid_focal_loss_is_the_mean_over_batch_and_classes():
    """The published code's torch.mean over the (B, C) terms, not their sum over classes."""
    logits = torch.tensor([[1.0, 0.0, -2.0], [-1.0, 3.0, 0.5]])
    target = torch.tensor([2, 1])
    terms = [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for c in range(3):
            p = 1 / (1 + math.exp(-logits[i, c].item()))
            p_t = p if c == target[i].item() else 1 - p
            terms[i][c] = (1 - p_t) ** 2 * -math.log(p_t)
    expected = sum(map(sum, terms)) / 6
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    w = [0.2, 1.0, 0.6]
    weighted = sum(w[c] * terms[i][c] for i in range(2) for c in range(3)) / 6
    assert focal_loss(logits, target, weights=torch.tensor(w)).item() == pytest.approx(weighted, rel=1e-5)


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ce = F.cross_entropy(logits, y)
    assert focal_loss(logits, y, gamma=0.0, form="softmax").item() == pytest.approx(ce.item(), rel=1e-5)
    hot = F.one_hot(y, 4).float()
    bce = F.binary_cross_entropy_with_logits(logits, hot)  # mean over batch and classes
    assert focal_loss(logits, y, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-5)
    # multi-hot targets use the same sigmoid form
    assert focal_loss(logits, hot, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-5)


def test_focal_loss_down_weights_easy_examples_and_rejects_bad_forms():
    easy, hard = torch.tensor([[6.0, -6.0]]), torch.tensor([[0.2, -0.2]])
    y = torch.tensor([0])
    ratio_focal = focal_loss(easy, y, form="softmax") / focal_loss(hard, y, form="softmax")
    ratio_ce = F.cross_entropy(easy, y) / F.cross_entropy(hard, y)
    assert ratio_focal < ratio_ce
    with pytest.raises(ValueError):
        focal_loss(easy, torch.tensor([[1.0, 1.0]]), form="softmax")
    with pytest.raises(ValueError):
        focal_loss(easy, y, form="bogus")
