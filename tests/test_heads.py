"""Margin heads against independent values: hand-worked numbers, the acos route, pytorch-metric-learning."""
import math
import random

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from unifex_lib.data.annotations import read_class_counts
from unifex_lib.models import PKBatchSampler, create_head, list_heads
from unifex_lib.models.heads import MarginHead, cosine

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

C, D = 7, 16
COUNTS = [50, 3, 20, 8, 50, 12, 30]


def make(name, k=1, **kw):
    if name in ("DynM-ArcFace", "CLAM"):
        kw.setdefault("class_counts", COUNTS)
    return create_head(name, C, D, k=k, **kw).double()


def batch(seed=0, b=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (b,), generator=g)
    return x, y


def loss_and_grads(head, x, y, loss_fn=None):
    x = x.clone().requires_grad_(True)
    head.zero_grad()
    loss = loss_fn(x, y) if loss_fn else head.loss(x, y)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad.clone()


def acos_cos(x, w):
    """cos θ through the acos route's own normalisation (independent of unifex's `cosine`)."""
    return (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()


def arcface_acos(cos, y, s, m):
    """ArcFace through θ = acos(cos θ): s·cos(θ + m) on the target (fallback cos θ − m sin m past π − m)."""
    theta = torch.acos(cos)
    target = torch.where(theta + m <= math.pi, torch.cos(theta + m), cos - m * math.sin(m))
    onehot = F.one_hot(y, cos.shape[1]).bool()
    return s * torch.where(onehot, target, cos)


# ---------------------------------------------------------------------------------------- hand-worked


def test_hand_worked_logits():
    # two classes at 0° and 90°, embedding at 30° (label 0): cos θ0 = √3/2, cos θ1 = 1/2
    x = torch.tensor([[math.sqrt(3.0), 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    expected = {  # s = 1, m = 0.5 rad; numbers worked by hand
        "ArcFace": [0.5202960232, 0.5],  # cos(π/6 + 0.5) = cos(1.0235988)
        "CosFace": [0.3660254038, 0.5],  # √3/2 − 0.5
        "LiArcFace": [0.3483567805, 0.3333333333],  # (π − 2(π/6 + 0.5))/π ; (π − 2π/3)/π
    }
    for name, values in expected.items():
        head = create_head(name, 2, 2, s=1.0, m=0.5).double().eval()
        with torch.no_grad():
            head.weight.copy_(torch.eye(2))
        torch.testing.assert_close(head(x, y), torch.tensor([values], dtype=torch.float64), atol=1e-9, rtol=0)


def test_arcface_fallback_past_pi_minus_m():
    # embedding at 170° from its class centre with m = 0.5: θ + m > π, logit = cos θ − m·sin m
    head = create_head("ArcFace", 2, 2, s=1.0, m=0.5).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    a = math.radians(170)
    logits = head(torch.tensor([[math.cos(a), math.sin(a)]], dtype=torch.float64), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(math.cos(a) - 0.5 * math.sin(0.5), abs=1e-12)


def test_dynm_margins_by_label_whatever_row_order(tmp_path):
    counts = {0: 10, 1: 1, 2: 5, 3: 10}
    rows = [(3, 10), (1, 1), (0, 10), (2, 5)]  # shuffled rows
    path = tmp_path / "class_counts.csv"
    pd.DataFrame(rows, columns=["label", "num_samples"]).to_csv(path, index=False)
    class_counts = read_class_counts(path, 4)
    assert class_counts == [counts[c] for c in range(4)]
    head = create_head("DynM-ArcFace", 4, 3, class_counts=class_counts, m_min=0.2, m_max=0.5)
    # n' = (n - 1)/9 = [1, 0, 4/9, 1]; m = 0.2 + 0.15(1 + cos(π n'))
    expected = [0.2, 0.5, 0.2 + 0.15 * (1 + 0.1736481777), 0.2]
    torch.testing.assert_close(head.margin.class_margins, torch.tensor(expected), atol=1e-7, rtol=0)
    # the per-class margin is what ArcFace applies to a sample of that class
    head = head.double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    cos = acos_cos(x, head.weight)
    ref = torch.stack([arcface_acos(cos[i:i + 1], y[i:i + 1], 30.0, expected[y[i]])[0] for i in range(8)])
    torch.testing.assert_close(head(x, y), ref, atol=1e-6, rtol=0)


def test_dynm_count_errors():
    with pytest.raises(ValueError, match="class_counts"):
        create_head("CLAM", 4, 3)
    with pytest.raises(ValueError, match="does not fit"):
        create_head("CLAM", 4, 3, class_counts=[1, 2, 3])


# ---------------------------------------------------------------------------------------- second routes


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_arcface_cos_expansion_equals_acos_route(k):
    head = make("ArcFace", k=k)
    x, y = batch(k)
    ref_head = make("ArcFace", k=k)
    ref_head.load_state_dict(head.state_dict())

    def acos_loss(x, y):
        cos = acos_cos(x, ref_head.weight).view(len(x), C, k).amax(dim=2)
        return F.cross_entropy(arcface_acos(cos, y, 30.0, 0.5), y)

    for a, b in zip(loss_and_grads(head, x, y), loss_and_grads(ref_head, x, y, acos_loss)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_subcentre_max_reduction(k):
    w = torch.randn(C * k, D, dtype=torch.float64)
    x = torch.randn(9, D, dtype=torch.float64)
    full = acos_cos(x, w)
    expected = torch.stack([torch.stack([max(full[i, c * k + j] for j in range(k)) for c in range(C)])
                            for i in range(len(x))])
    torch.testing.assert_close(cosine(x, w, k), expected)


PML_CASES = [  # (our head, k, m in radians, their loss); pytorch-metric-learning's ArcFace margin is in degrees
    ("ArcFace", 1, 0.5, lambda k, m: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(m), scale=30.0)),
    *[("ArcFace", k, 0.5, lambda k, m: pml_losses.SubCenterArcFaceLoss(
        num_classes=C, embedding_size=D, margin=math.degrees(m), scale=30.0, sub_centers=k)) for k in (2, 3, 5)],
    ("CosFace", 1, 0.35, lambda k, m: pml_losses.CosFaceLoss(C, D, margin=m, scale=30.0)),
]


@pytest.mark.parametrize("name,k,m,pml_loss", PML_CASES, ids=[f"{c[0]}-k{c[1]}" for c in PML_CASES])
def test_against_pytorch_metric_learning(name, k, m, pml_loss):
    head = make(name, k=k, s=30.0, m=m)
    ref = pml_loss(k, m)
    ref.W = torch.nn.Parameter(head.weight.detach().t().clone())
    x, y = batch(10 + k)
    ours = loss_and_grads(head, x, y)
    xr = x.clone().requires_grad_(True)
    theirs = ref(xr, y)
    theirs.backward()
    torch.testing.assert_close(ours[0], theirs.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], xr.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[2], ref.W.grad.t(), atol=1e-6, rtol=0)


def test_triplet_batch_hard_against_pytorch_metric_learning():
    x, _ = batch(4, b=16)
    y = torch.arange(4).repeat_interleave(4)
    head = create_head("Triplet", C, D, m=0.3)
    xa = x.clone().requires_grad_(True)
    loss = head.loss(xa, y)
    loss.backward()
    ref = pml_losses.TripletMarginLoss(margin=0.3, reducer=pml_reducers.MeanReducer())
    xb = x.clone().requires_grad_(True)
    ref_loss = ref(xb, y, pml_miners.BatchHardMiner()(xb, y))
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=0)


def test_liarcface_formula():
    head = make("LiArcFace", s=30.0, m=0.5)
    x, y = batch(5)
    theta = torch.acos(acos_cos(x, head.weight))
    expected = 30.0 * (math.pi - 2 * (theta + 0.5 * F.one_hot(y, C))) / math.pi
    torch.testing.assert_close(head(x, y), expected, atol=1e-6, rtol=0)


def test_adacos_dynamic_scale():
    head = make("AdaCos").train()
    assert head.margin.scale.item() == pytest.approx(math.sqrt(2) * math.log(C - 1))
    x, y = batch(6)
    s0 = head.margin.scale.item()
    cos = acos_cos(x, head.weight).detach()
    onehot = F.one_hot(y, C).bool()
    b_avg = torch.where(onehot, 0.0, torch.exp(s0 * cos)).sum() / len(x)
    theta_med = torch.median(torch.acos(cos[onehot]))
    s1 = (torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4))).item()
    logits = head(x, y)
    assert head.margin.scale.item() == pytest.approx(s1, abs=1e-9)
    torch.testing.assert_close(logits, s1 * cos, atol=1e-6, rtol=0)
    head.eval()
    head(x, y)
    assert head.margin.scale.item() == pytest.approx(s1, abs=1e-9)  # frozen outside training


def curricular_reference(cos, y, t, s=30.0, m=0.5):
    """The CurricularFace authors' forward (gather/scatter version), returning (logits, new t)."""
    cos = cos.clone()
    target = cos[torch.arange(len(y)), y].view(-1, 1)
    sin = torch.sqrt(1.0 - target ** 2)
    cos_theta_m = target * math.cos(m) - sin * math.sin(m)
    mask = cos > cos_theta_m
    final_target = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    t = target.mean().detach() * 0.01 + 0.99 * t
    hard = cos[mask]
    cos[mask] = hard * (t + hard)
    cos.scatter_(1, y.view(-1, 1), final_target)
    return cos * s, t


def test_curricularface_against_reference():
    head = make("CurricularFace").train()
    ref_head = make("CurricularFace")
    ref_head.load_state_dict(head.state_dict())
    t = torch.zeros((), dtype=torch.float64)
    for seed in range(3):
        x, y = batch(20 + seed)

        def ref_loss(x, y):
            nonlocal t
            logits, t = curricular_reference(acos_cos(x, ref_head.weight), y, t)
            return F.cross_entropy(logits, y)

        for a, b in zip(loss_and_grads(head, x, y), loss_and_grads(ref_head, x, y, ref_loss)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert head.margin.t.item() == pytest.approx(t.item(), abs=1e-9)
    assert head.margin.t.item() != 0.0


def adaface_reference(cos, norms, y, stats, s=30.0, m=0.5, h=0.333, t_alpha=0.01, eps=1e-3):
    """The AdaFace authors' forward, with the angular clip applied on the target only (as the issue states)."""
    safe = torch.clip(norms, 0.001, 100).detach()
    mean, std = stats
    mean = safe.mean() * t_alpha + (1 - t_alpha) * mean
    std = safe.std() * t_alpha + (1 - t_alpha) * std
    z = torch.clip(h * (safe - mean) / (std + eps), -1, 1).view(-1, 1)
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    theta = torch.acos(cos)
    theta_m = torch.clip(theta - m * z, eps, math.pi - eps)
    target = torch.cos(theta_m) - (m + m * z)
    return s * (onehot * target + (1 - onehot) * cos), (mean, std)


def test_adaface_against_reference():
    head = make("AdaFace").train()
    ref_head = make("AdaFace")
    ref_head.load_state_dict(head.state_dict())
    stats = (torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64))
    for seed in range(3):
        x, y = batch(30 + seed)

        def ref_loss(x, y):
            nonlocal stats
            logits, stats = adaface_reference(acos_cos(x, ref_head.weight), x.norm(dim=1), y, stats)
            return F.cross_entropy(logits, y)

        for a, b in zip(loss_and_grads(head, x, y), loss_and_grads(ref_head, x, y, ref_loss)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert head.margin.batch_mean.item() == pytest.approx(stats[0].item(), abs=1e-6)
    assert head.margin.batch_std.item() == pytest.approx(stats[1].item(), abs=1e-6)


# ---------------------------------------------------------------------------------------- every head


@pytest.mark.parametrize("name", list_heads())
def test_every_head_forward_backward_float32_and_finite_at_cos_pm1(name):
    head = create_head(name, C, D, k=2, class_counts=COUNTS).train()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    # embeddings equal to (cos = +1) and opposite to (cos = -1) class centres
    w = head.weight.detach() if hasattr(head, "weight") else torch.randn(C * 2, D)
    x = torch.stack([w[0], -w[0], w[2], -w[3], w[4], w[5]]).clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(x, y)
        if isinstance(head, MarginHead):
            assert head(x, y).dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for p in head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_unknown_head_names_valid_ones():
    with pytest.raises(ValueError) as e:
        create_head("ArcFce", C, D)
    assert "ArcFce" in str(e.value)
    for name in ("ArcFace", "DynM-ArcFace", "CLAM", "AdaCos", "LiArcFace", "CurricularFace", "AdaFace", "CosFace",
                 "Triplet"):
        assert name in str(e.value)


def test_heads_do_not_change_caller_tensors():
    for name in list_heads():
        head = make(name, k=2)
        x, y = batch(7)
        x0, y0 = x.clone(), y.clone()
        head.loss(x, y)
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_pk_sampler_batches():
    labels = [c for c in range(10) for _ in range(random.Random(c).randint(1, 9))]
    sampler = PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for b in batches:
        classes = pd.Series([labels[i] for i in b]).value_counts()
        assert len(classes) == 4 and (classes == 3).all()
    sampler.set_epoch(1)
    assert list(sampler) != batches
