"""Training helpers: schedule formula, checkpoint files, sampling, SAM, feature cache."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from unifex_lib.params import TrainParams
from unifex_lib.training.checkpoint import (decode_state, encode_state, latest_checkpoint, list_checkpoints,
                                            load_checkpoint, resolve_checkpoint, save_checkpoint)
from unifex_lib.training.feature_cache import (FeatureDataset, cache_key, cached_features, valid_rows,
                                               weights_fingerprint)
from unifex_lib.training.optim import SAM, create_optimizer
from unifex_lib.training.sampling import DomainBatchSampler, PKBatches, epoch_batches
from unifex_lib.training.schedules import Schedule, create_schedule


# ---------------------------------------------------------------- schedules
def test_linear_warmup_times_cosine_per_iteration():
    s = Schedule(lr=0.02, total_steps=100, steps_per_epoch=10, warmup_steps=10, eta_min=0.001)
    assert s.lr_at(0) == pytest.approx(0.1 * (0.001 + 0.019 * (1 + math.cos(0.0)) / 2))  # 0.1 * 0.02
    assert s.lr_at(0) == pytest.approx(0.002)
    assert s.lr_at(4) == pytest.approx(0.5 * (0.001 + 0.019 * (1 + math.cos(math.pi * 0.04)) / 2))
    assert s.lr_at(50) == pytest.approx(0.0105)  # cos(pi/2) = 0: halfway between 0.02 and 0.001
    assert s.lr_at(100) == pytest.approx(0.001)


def test_exponential_warmup_and_cosine_per_epoch():
    s = Schedule(lr=0.02, total_steps=100, steps_per_epoch=10, warmup_steps=10, warmup="exponential",
                 schedule_step="epoch", eta_min=0.001)
    # tau = W / 2 = 5: at step 4, w = 1 - e^-1; the cosine is at epoch 0 -> 0.02
    assert s.lr_at(4) == pytest.approx((1 - math.exp(-1)) * 0.02)
    # step 25 is in epoch 2 of 10; w = 1 - e^-(26/5)
    assert s.lr_at(25) == pytest.approx((1 - math.exp(-5.2)) * (0.001 + 0.019 * (1 + math.cos(0.2 * math.pi)) / 2))
    assert s.lr_at(29) == pytest.approx(s.lr_at(25) * (1 - math.exp(-6)) / (1 - math.exp(-5.2)))


def test_create_schedule_warmup_length_from_epochs_or_iterations():
    assert create_schedule(TrainParams(warmup_epochs=1.5), 8, 80).warmup_steps == 12
    assert create_schedule(TrainParams(warmup_iterations=5), 8, 80).warmup_steps == 5
    constant = create_schedule(TrainParams(scheduler="constant", warmup="none", lr=0.1), 8, 80)
    assert [constant.lr_at(i) for i in (0, 40, 80)] == [0.1, 0.1, 0.1]


# ---------------------------------------------------------------- checkpoints
def _optimizer_state():
    w = nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([w], lr=0.1)
    w.sum().backward()
    opt.step()
    return opt


def test_state_roundtrip_keeps_int_keys_tuples_and_arrays():
    opt = _optimizer_state()
    state = {"optimizer": opt.state_dict(), "rng": (3, np.arange(4, dtype=np.uint32), 1.5), "step": 7}
    tensors = {}
    decoded = decode_state(json.loads(json.dumps(encode_state(state, tensors))), tensors)
    assert list(decoded["optimizer"]["state"]) == [0]
    assert torch.equal(decoded["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert decoded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert isinstance(decoded["rng"], tuple) and decoded["rng"][1].dtype == np.uint32
    torch.optim.Adam([nn.Parameter(torch.zeros(3, 2))]).load_state_dict(decoded["optimizer"])


def test_checkpoints_keep_last_and_best_skip_partial_and_never_unpickle(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        save_checkpoint(d, f"step_{step:07d}", {"w": torch.full((2,), float(step))}, {"step": step},
                        keep_last=2, keep=["step_0000002"])
    assert [p.stem for p in list_checkpoints(d)] == ["step_0000002", "step_0000006", "step_0000008"]
    assert not (d / "step_0000004.safetensors").exists()
    # a kill while saving leaves files without (or with a truncated) JSON: never listed or loaded
    (d / "step_0000010.safetensors").write_bytes(b"partial")
    (d / "step_0000012.safetensors").write_bytes(b"x")
    (d / "step_0000012.state.safetensors").write_bytes(b"x")
    (d / "step_0000012.json").write_text('{"step": 12, "na')
    assert latest_checkpoint(d).stem == "step_0000008"
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    weights, state = load_checkpoint(d / "step_0000008.safetensors")
    assert torch.equal(weights["w"], torch.full((2,), 8.0)) and state["step"] == 8
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(d / "step_0000010.safetensors")


# ---------------------------------------------------------------- sampling
DOMAINS = ["a"] * 10 + ["b"] * 7 + ["c"] * 4


def test_shuffle_covers_each_sample_once():
    batches = epoch_batches(DOMAINS, 4, "shuffle", seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert len(batches) == 5 and len(set(flat.tolist())) == 20 and all(len(b) == 4 for b in batches)
    assert not np.array_equal(flat, np.concatenate(epoch_batches(DOMAINS, 4, "shuffle", seed=1, epoch=1)))


@pytest.mark.parametrize("mode", ["round_robin", "proportional"])
def test_one_domain_per_batch(mode):
    batches = epoch_batches(DOMAINS, 3, mode, seed=0, epoch=0)
    domain_of = [{DOMAINS[i] for i in b} for b in batches]
    assert all(len(d) == 1 for d in domain_of)
    names = [d.pop() for d in domain_of]
    assert sorted(names) == ["a"] * 3 + ["b"] * 2 + ["c"]  # floor(n_d / 3) batches per domain
    if mode == "round_robin":
        assert names == ["a", "b", "c", "a", "b", "a"]


def test_ranks_split_the_global_batch_and_resume_mid_epoch():
    one = DomainBatchSampler(DOMAINS, 4, "shuffle", seed=3)
    ranks = [DomainBatchSampler(DOMAINS, 4, "shuffle", seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    for full, r0, r1 in zip(one, *ranks):
        assert full == r0 + r1
    one.set_epoch(2, start=3)
    assert list(one) == [b.tolist() for b in epoch_batches(DOMAINS, 4, "shuffle", 3, 2)[3:]]
    with pytest.raises(ValueError, match="divisible"):
        DomainBatchSampler(DOMAINS, 5, world_size=2)


def test_pk_batches_for_triplet_are_class_balanced_and_resumable():
    labels = [i % 6 for i in range(48)]
    s = PKBatches(labels, 8, 2, seed=1, rank=1, world_size=2)  # 4 per rank: P = 2 classes x K = 2
    assert s.steps_per_epoch == 6
    s.set_epoch(3)
    batches = list(s)
    assert len(batches) == 6
    assert all(sorted(np.unique([labels[i] for i in b], return_counts=True)[1]) == [2, 2] for b in batches)
    s.set_epoch(3, start=4)
    assert list(s) == batches[4:]


# ---------------------------------------------------------------- optimizers
def test_sam_step_equals_adam_step_with_the_perturbed_gradient():
    torch.manual_seed(0)
    x, w0 = torch.randn(5, 3), torch.randn(3)

    def loss_at(w):
        return ((x @ w).tanh() ** 2).sum()

    w = nn.Parameter(w0.clone())
    sam = create_optimizer([w], "Adam", lr=0.1, sam=True, sam_rho=0.05)
    assert isinstance(sam, SAM)
    loss_at(w).backward()
    sam.step(lambda: loss_at(w).backward())
    # by hand: g at w0, e = rho g / |g|, g' at w0 + e, then one Adam step from w0 with g'
    w_ref = w0.clone().requires_grad_()
    g = torch.autograd.grad(loss_at(w_ref), w_ref)[0]
    w_pert = (w0 + 0.05 * g / g.norm()).requires_grad_()
    g2 = torch.autograd.grad(loss_at(w_pert), w_pert)[0]
    ref = nn.Parameter(w0.clone())
    adam = torch.optim.Adam([ref], lr=0.1)
    ref.grad = g2
    adam.step()
    torch.testing.assert_close(w.detach(), ref.detach())


def test_optimizer_choices():
    p = [nn.Parameter(torch.zeros(2))]
    assert create_optimizer(p, "SGD", 0.1, momentum=0.8).param_groups[0]["momentum"] == 0.8
    assert isinstance(create_optimizer(p, "AdamW", 0.1, sam=True).base_optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match="choose one of Adam, AdamW, SGD"):
        create_optimizer(p, "Adamw", 0.1)


# ---------------------------------------------------------------- feature cache
class _Backbone(nn.Module):
    num_features = 3

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n, bad=()):
        self.x, self.bad = torch.randn(n, 4), set(bad)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return None if i in self.bad else (self.x[i], i % 2, i)


def test_feature_cache_extracts_once_rebuilds_corrupt_and_marks_bad_rows(tmp_path):
    torch.manual_seed(0)
    backbone, items = _Backbone().eval(), _Items(10, bad=[4])
    key = cache_key("tiny", "w0", "center_crop", "data0")
    feats = cached_features(backbone, items, key, tmp_path, batch_size=4)
    expected = backbone.lin(items.x).detach().numpy()
    rows = valid_rows(feats)
    assert rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    np.testing.assert_allclose(feats[rows], expected[rows], rtol=1e-6)
    calls = backbone.calls
    cached_features(backbone, items, key, tmp_path, batch_size=4)
    assert backbone.calls == calls  # valid cache: no extraction
    data = tmp_path / f"{key}.f32"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0xFF
    data.write_bytes(bytes(raw))  # corrupt
    np.testing.assert_allclose(cached_features(backbone, items, key, tmp_path, batch_size=4)[rows], expected[rows],
                               rtol=1e-6)
    assert backbone.calls > calls
    data.write_bytes(data.read_bytes()[:20])  # truncated
    assert cached_features(backbone, items, key, tmp_path, batch_size=4).shape == (10, 3)
    assert cache_key("tiny", "w1", "center_crop", "data0") != key
    ds = FeatureDataset(feats, [7] * len(rows), rows)
    x, y, i = ds[4]
    np.testing.assert_allclose(x.numpy(), expected[5], rtol=1e-6)
    assert (y, i) == (7, 4)


def test_weights_fingerprint_covers_buffers_and_changes_with_weights():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # num_batches_tracked: a 0-d int64 buffer
    before = weights_fingerprint(net)
    assert before == weights_fingerprint(net)
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-3
    assert weights_fingerprint(net) != before
