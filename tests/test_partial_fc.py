"""PartialFC: equals the full head at sample_rate 1 (one process and 2-process gloo DDP); keeps positives."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unifex_lib.models import PartialFC, create_head
from unifex_lib.models.heads import MarginHead

C, D, K, B = 11, 8, 2, 6
NAMES = ("ArcFace", "CosFace", "CurricularFace", "AdaFace", "LiArcFace", "AdaCos", "CLAM")
COUNTS = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 2]


def full_head(name):
    torch.manual_seed(0)
    return create_head(name, C, D, k=K, class_counts=COUNTS).double()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * B, D, generator=g, dtype=torch.float64), torch.randint(0, C, (2 * B,), generator=g)


def run(head, x, y):
    x = x.clone().requires_grad_(True)
    loss = head.loss(x, y)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


@pytest.mark.parametrize("name", NAMES)
def test_sample_rate_one_equals_full_head(name):
    full = full_head(name).train()
    assert isinstance(full, MarginHead)
    assert isinstance(create_head(name, C, D, k=K, class_counts=COUNTS, sample_rate=0.5), PartialFC)
    pfc = PartialFC(copy.deepcopy(full.margin), C, D, k=K, sample_rate=1.0).double().train()
    pfc.load_state_dict(full.state_dict())
    x, y = data()
    x0, y0 = x.clone(), y.clone()
    for a, b in zip(run(full, x, y), run(pfc, x, y)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    for key, value in full.state_dict().items():  # margin statistics (t, norms, s) updated alike
        torch.testing.assert_close(value, pfc.state_dict()[key])


def test_sampling_keeps_every_positive():
    torch.manual_seed(1)
    pfc = create_head("ArcFace", 1000, D, k=K, sample_rate=0.05).train()
    x, y = torch.randn(32, D), torch.randint(0, 1000, (32,))
    y0 = y.clone()
    for _ in range(5):
        index, target = pfc.sample(y)
        assert len(index) == 50 and set(y.tolist()) <= set(index.tolist())
        assert torch.equal(index[target], y)  # each label's column holds its class
    assert pfc(x, y).shape == (32, 50)
    pfc.loss(x, y).backward()
    touched = pfc.weight.grad.view(1000, K, D).abs().sum(dim=(1, 2)) > 0
    assert touched.sum() == 50 and touched[y].all()
    assert torch.equal(y, y0)
    pfc.eval()
    assert pfc(x, y).shape == (32, 1000)  # evaluation uses every class


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {}
        x, y = data()
        mine = slice(rank * B, (rank + 1) * B)
        for name in NAMES:
            full = full_head(name)
            pfc = PartialFC(copy.deepcopy(full.margin), C, D, k=K, sample_rate=1.0).double().train()
            pfc.margin.load_state_dict(full.margin.state_dict())
            pfc.load_full_weight(full.weight.detach())
            assert torch.equal(pfc.full_weight(), full.weight.detach())
            loss, gx, gw = run(pfc, x[mine], y[mine])
            out[name] = (loss, gx, gw, pfc.class_start * K, (pfc.class_start + pfc.num_local) * K)
        # a plain CurricularFace head under DDP: t from the whole (gathered) batch, equal on both ranks
        curricular = full_head("CurricularFace").train()
        curricular.loss(x[mine], y[mine])
        out["t"] = curricular.margin.t.clone()
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_equals_full_head(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    x, y = data()
    for name in NAMES:
        full_loss, full_gx, full_gw = run(full_head(name).train(), x, y)
        for rank in (0, 1):
            loss, gx, gw, start, stop = results[rank][name]
            torch.testing.assert_close(loss, full_loss, atol=1e-9, rtol=0)
            torch.testing.assert_close(gx, full_gx[rank * B:(rank + 1) * B], atol=1e-9, rtol=0)
            torch.testing.assert_close(gw, full_gw[start:stop], atol=1e-9, rtol=0)
    reference = full_head("CurricularFace").train()
    reference.loss(x, y)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["t"], reference.margin.t)
