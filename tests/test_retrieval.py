"""kNN backends and retrieval metrics against hand-worked values and independent implementations."""
import numpy as np
import pytest
import torch

from unifex_lib.retrieval import (average_precision, compute_metrics, count_relevant, evaluate, exclude_self,
                                  knn_search, label_matrix, map_at_k, map_at_r, mmp_at_k, r_precision,
                                  recall_at_k, relevance)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, dim, n_classes, seed, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, size=n)
    return unit(centres[labels] + noise * rng.normal(size=(n, dim))), labels


# rows: q0 n_q=3, q1 n_q=1 (< 5; its hit at rank 2 does not count for mMP@5), q2 n_q=7, q3 n_q=0
REL = np.array([[1, 0, 1, 0, 0, 0, 0, 0],
                [0, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 1, 0],
                [0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
N_Q = np.array([3, 1, 7, 0])


def test_metrics_hand_worked():
    nan = np.nan
    np.testing.assert_allclose(recall_at_k(REL, N_Q, 1), [1, 0, 1, nan])
    np.testing.assert_allclose(recall_at_k(REL, N_Q, 5), [1, 1, 1, nan])
    np.testing.assert_allclose(mmp_at_k(REL, N_Q, 5), [2 / 3, 0, 1, nan])
    # mAP@5: (1/min(n_q,5)) sum_j P@j rel_j; q0 = (1 + 2/3) / 3, q1 = (1/2) / 1
    np.testing.assert_allclose(map_at_k(REL, N_Q, 5), [5 / 9, 1 / 2, 1, nan])
    np.testing.assert_allclose(r_precision(REL, N_Q), [2 / 3, 0, 6 / 7, nan])
    np.testing.assert_allclose(map_at_r(REL, N_Q), [5 / 9, 0, (5 + 6 / 7) / 7, nan])
    np.testing.assert_allclose(average_precision(REL, N_Q), [5 / 9, 1 / 2, (5 + 6 / 7) / 7, nan])


def test_metric_names_and_summary():
    values = compute_metrics(REL, N_Q, ["R@1", "mMP@5", "Recall@2"])
    assert values["R@1"][:3].mean() == pytest.approx(2 / 3)
    assert np.nanmean(values["mMP@5"]) == pytest.approx((2 / 3 + 0 + 1) / 3)
    with pytest.raises(ValueError, match=r"unknown metric 'mmp@5'.*mMP@5"):
        compute_metrics(REL, N_Q, ["mmp@5"])
    with pytest.raises(ValueError, match="needs at least 10 neighbours"):
        compute_metrics(REL, N_Q, ["Recall@10"])


def test_exclude_self_by_identity_differs_from_dropping_rank_1():
    # query 0 has an exact duplicate (index 1): the search may rank the duplicate first
    scores = np.array([[1.0, 1.0, 0.2], [0.9, 0.5, 0.1]], dtype=np.float32)
    ids = np.array([[1, 0, 2], [2, 0, 1]])
    s, i = exclude_self(scores, ids, np.array([0, -1]), k=2)
    np.testing.assert_array_equal(i, [[1, 2], [2, 0]])  # query 1 is not in the index: last column dropped
    np.testing.assert_allclose(s, [[1.0, 0.2], [0.9, 0.5]], rtol=1e-6)
    labels = label_matrix([0, 0, 1])
    assert relevance(labels[:1], labels, i[:1]).tolist() == [[True, False]]
    # dropping rank 1 instead would keep the query itself (id 0) as its first neighbour
    assert ids[0, 1:].tolist() == [0, 2]


def test_multi_label_relevance_and_n_q():
    q = label_matrix([[3, 5], 7])
    x = label_matrix([3, 5, 5, 7, [3, 9]])
    np.testing.assert_array_equal(count_relevant(q, x), [2 + 2, 1])
    np.testing.assert_array_equal(count_relevant(q, x, self_ids=[-1, 3]), [4, 0])
    rel = relevance(q, x, np.array([[4, 3, -1], [0, 3, 1]]))
    np.testing.assert_array_equal(rel, [[True, False, False], [False, True, False]])


def test_self_in_index_vs_separate_index():
    # 1-d circle: items at angles; classes 0,0,0,1
    angles = np.radians([0, 10, 50, 30])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = [0, 0, 0, 1]
    same = evaluate(x, x, labels, labels, ["R@1", "mMP@5"], self_ids=np.arange(4), per_query=True)
    # query 0: neighbours 10 (rel), 30 (class 1), 50 (rel); n_q = 2 -> mMP@5 = 1/2
    np.testing.assert_array_equal(same[1], [2, 2, 2, 0])
    np.testing.assert_allclose(same[0]["mMP@5"][:3], [1 / 2, 1 / 2, 1 / 2])
    np.testing.assert_allclose(same[0]["R@1"][:3], [1, 1, 0])
    # the same queries against a separate index (copies): the copy of the query itself is relevant
    sep = evaluate(x[:3], x.copy(), labels[:3], labels, ["R@1", "mMP@5"], per_query=True)
    np.testing.assert_array_equal(sep[1], [3, 3, 3])
    np.testing.assert_allclose(sep[0]["R@1"], [1, 1, 1])
    np.testing.assert_allclose(sep[0]["mMP@5"], [2 / 3, 2 / 3, 2 / 3])
    summary = evaluate(x, x, labels, labels, ["R@1"], self_ids=np.arange(4))
    assert summary == {"R@1": pytest.approx(2 / 3), "n_queries": 4, "n_q0": 1}


def test_recall_at_large_k_on_small_index():
    x, y = clustered(30, 8, 3, seed=0)
    out = evaluate(x, x, y, y, ["Recall@1000", "Recall@1"], self_ids=np.arange(30))
    assert out["Recall@1000"] == 1.0 and out["Recall@1"] <= 1.0


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_backends_equal_brute_force(backend):
    rng = np.random.default_rng(1)
    q, x = unit(rng.normal(size=(300, 16))), unit(rng.normal(size=(1000, 16)))
    top = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 10, dim=1)
    scores, ids = knn_search(q, x, 10, backend=backend, chunk_size=128)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(scores, top.values.numpy(), atol=1e-5)


def test_approximate_backends():
    x, _ = clustered(2000, 16, 20, seed=2, noise=0.3)
    exact = knn_search(x[:200], x, 1)[1][:, 0]
    ivf = knn_search(x[:200], x, 1, faiss_index="ivf", nlist=16, nprobe=16)[1][:, 0]
    np.testing.assert_array_equal(ivf, exact)  # all cells visited = exact
    hnsw = knn_search(x[:200], x, 1, faiss_index="hnsw")[1][:, 0]
    assert (hnsw == exact).mean() > 0.95
    scores, ids = knn_search(x[:200], x, 5, backend="annoy", n_trees=10)
    assert (ids[:, 0] == exact).mean() > 0.9
    np.testing.assert_allclose(scores[:, 0], (x[:200] * x[ids[:, 0]]).sum(1), atol=1e-4)  # cosine scores


def test_bad_options_name_valid_choices():
    x = unit(np.ones((4, 2)))
    with pytest.raises(ValueError, match="unknown kNN backend 'fais'; choose one of faiss, torch, annoy"):
        knn_search(x, x, 1, backend="fais")
    with pytest.raises(ValueError, match="unknown faiss_index 'ivfpq'"):
        knn_search(x, x, 1, faiss_index="ivfpq")
    with pytest.raises(ValueError, match="unknown annoy_metric"):
        knn_search(x, x, 1, backend="annoy", annoy_metric="cosine")


@pytest.mark.parametrize("same_source", [True, False])
def test_equals_pytorch_metric_learning(same_source):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(400, 16, 40, seed=3, noise=1.0)
    y[:3] = [100, 101, 102]  # singleton classes: n_q = 0 when queries = index ("lone queries")
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count")
    if same_source:
        ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x), torch.from_numpy(y),
                                ref_includes_query=True)
        ours = evaluate(x, x, y, y, ["R@1", "MAP@R", "R-precision"], self_ids=np.arange(len(x)))
        assert ours["n_q0"] == 3
    else:
        q, qy, r, ry = x[:100], y[:100], x[100:], y[100:]
        ref = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(qy), torch.from_numpy(r), torch.from_numpy(ry))
        ours = evaluate(q, r, qy, ry, ["R@1", "MAP@R", "R-precision"])
    assert ours["R@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert ours["R-precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
