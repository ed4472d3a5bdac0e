"""Cluster discrimination: k-means determinism, tiny-cluster dropping, ARI, pseudo-label tables that
train, the class-centre memory report and the k-NN probe."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from unifex_lib.cluster import (adjusted_rand_index, class_centre_memory, drop_small_clusters, kmeans,
                                plot_cluster_sizes, pseudo_label_table, write_pseudo_labels)
from unifex_lib.data.annotations import read_annotations, read_class_counts


def _blobs(n_per=40, centres=4, dim=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, dim))
    x = np.repeat(mu, n_per, axis=0) + spread * rng.standard_normal((centres * n_per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(centres), n_per)


# ----------------------------------------------------------------------------- k-means, dropping, ARI
def test_kmeans_is_deterministic_by_seed():
    x, _ = np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32), None
    a, b, c = (kmeans(x, 12, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1, atol=1e-5)  # spherical
    # labels are the nearest centroid by inner product (second implementation, numpy)
    np.testing.assert_array_equal(a.labels, np.argmax(x @ a.centroids.T, axis=1))
    assert a.settings["seed"] == 7 and a.settings["num_clusters"] == 12 and a.settings["n"] == 600


def test_kmeans_recovers_separated_blobs_and_rejects_bad_k():
    x, truth = _blobs()
    result = kmeans(x, 4, seed=0, nredo=3)
    assert adjusted_rand_index(truth, result.labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"num_clusters=161 must be in 1\.\.160"):
        kmeans(x, 161)


def test_drop_small_clusters_renumbers_in_id_order():
    labels = [3, 3, 1, 5, 5, 5, 0, 4, 4]
    np.testing.assert_array_equal(drop_small_clusters(labels, 2), [0, 0, -1, 2, 2, 2, -1, 1, 1])
    np.testing.assert_array_equal(drop_small_clusters(labels, 1), [2, 2, 1, 4, 4, 4, 0, 3, 3])
    np.testing.assert_array_equal(drop_small_clusters(labels, 4), [-1] * 9)


def test_adjusted_rand_index_hand_worked():
    # contingency: class 0 -> cluster 0 (2), class 1 -> clusters 1, 2 (1 each)
    # sum C(n_ij) = 1, sum C(a_i) = 2, sum C(b_j) = 1, C(4) = 6, E = 2 * 1 / 6
    expected = (1 - 2 / 6) / ((2 + 1) / 2 - 2 / 6)  # = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(expected) == pytest.approx(4 / 7)
    # a dropped point (-1) is left out: the same value with a fifth point that was dropped
    assert adjusted_rand_index([0, 0, 1, 1, 1], [0, 0, 1, 2, -1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([5, 5, 7, 7], [1, 1, 0, 0]) == pytest.approx(1.0)  # label names do not matter


def test_class_centre_memory_hand_worked():
    m = class_centre_memory(1000, 64, k=3, sample_rate=0.1, optimizer="Adam", batch_size=128)
    assert m["weights"] == 1000 * 3 * 64 * 4 == 768_000
    assert m["gradients"] == 768_000 and m["optimizer_state"] == 2 * 768_000
    assert m["logits"] == 128 * 300 * 4  # ceil(0.1 * 3000) sampled centres
    assert m["total"] == 4 * 768_000 + 153_600
    sharded = class_centre_memory(1001, 64, k=1, optimizer="SGD", world_size=2, sample_rate=1.0, batch_size=8)
    assert sharded["weights"] == 501 * 64 * 4 and sharded["optimizer_state"] == sharded["weights"]
    assert "per rank of 2" in sharded["text"]
    with pytest.raises(ValueError, match="unknown optimizer 'Adagrad'; choose one of SGD, Adam, AdamW"):
        class_centre_memory(10, 8, optimizer="Adagrad")


def test_pseudo_label_table_files_and_plot(tmp_path):
    table = pd.DataFrame({"path": [f"images/{i}.png" for i in range(6)], "label": [9, 9, 8, 8, 7, 7],
                          "domain": ["a"] * 3 + ["b"] * 3, "split": "train"})
    labels = drop_small_clusters([2, 2, 0, 0, 0, 1], 2)  # cluster 1 (one image) dropped
    pseudo = pseudo_label_table(table, labels)
    assert pseudo["path"].tolist() == [f"images/{i}.png" for i in (0, 1, 2, 3, 4)]
    assert pseudo["label"].tolist() == [1, 1, 0, 0, 0] and set(pseudo["split"]) == {"train"}
    assert pseudo["true_label"].tolist() == [9, 9, 8, 8, 7]
    annotations, counts = write_pseudo_labels(pseudo, tmp_path)
    assert read_annotations(annotations)["label"].tolist() == [1, 1, 0, 0, 0]
    assert read_class_counts(counts, 2) == [3, 2]
    png = plot_cluster_sizes(labels, tmp_path / "sizes.png", min_size=2)
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="5 cluster labels for a table of 6 rows"):
        pseudo_label_table(table, labels[:5])


# ----------------------------------------------------------------------------- on demo data
@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A random-init tiny ViT saved as a weights file: a stand-in for pretrained foundation weights
    (same weights, same ``model_id`` for every backbone built from it, so the feature cache is shared)."""
    import torch
    from safetensors.torch import save_file

    from unifex_lib.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("timm", "test_vit", pretrained=False, image_size=32).model
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_cluster_images_is_deterministic_and_its_table_trains(tiny_demo, vit_weights, tmp_path, one_thread):
    from unifex_lib.cluster import cluster_images
    from unifex_lib.models import create_backbone
    from unifex_lib.params import load_params
    from unifex_lib.train import train

    out = tmp_path / "outputs"
    backbone = create_backbone("timm", "test_vit", pretrained=vit_weights, image_size=32)
    runs = [cluster_images(tiny_demo / "train.csv", out / name, backbone, num_clusters=12, seed=3,
                           cache_dir=out / "feature_cache") for name in ("a", "b")]
    a, b = runs
    assert a.annotations.read_bytes() == b.annotations.read_bytes()  # deterministic by seed
    assert a.num_clusters == 12 and len(a.table) == 48 and set(a.table["split"]) == {"train"}
    assert a.ari == pytest.approx(adjusted_rand_index(a.table["true_label"], a.table["label"]))
    print(f"ARI of 12 k-means clusters of random-init test_vit features vs the 16 true classes: {a.ari:.3f}")
    summary = json.loads(a.summary.read_text())
    assert summary["kmeans"]["seed"] == 3 and sum(summary["cluster_sizes"]) == 48 and summary["ari"] == a.ari
    assert a.plot.is_file()

    params = load_params("params/demo.yaml", data_root=str(tiny_demo), annotations=str(a.annotations),
                         class_counts=str(a.class_counts), output_dir=str(out), run_name="pseudo",
                         backbone="test_vit", pretrained=vit_weights, image_size=32, freeze=True,
                         feature_cache=True, embedding_dim=16, iterations=2, checkpoint_every=2, batch_size=16,
                         sample_rate=0.5, eval_batch_size=64)
    result = train(params)
    assert result["steps"] == 2 and result["best_checkpoint"]
    # training found the features that clustering cached: one cache entry, not two
    assert len(list((out / "feature_cache").glob("*.f32"))) == 1


def test_compare_with_zero_shot_table(tiny_demo, vit_weights, tmp_path, one_thread):
    from unifex_lib.cluster import compare_with_zero_shot
    from unifex_lib.params import load_params

    params = load_params("params/demo.yaml", data_root=str(tiny_demo), output_dir=str(tmp_path), run_name="cmp",
                         backbone="test_vit", pretrained=vit_weights, image_size=32, freeze=True,
                         feature_cache=True, embedding_dim=16, iterations=2, checkpoint_every=2, batch_size=16,
                         sample_rate=0.5, eval_batch_size=64)
    table = compare_with_zero_shot(params, num_clusters=12, min_cluster_size=2, seed=0)
    print(table.to_string())
    assert table["model"].tolist() == ["zero-shot", "pseudo-labels", "supervised"]
    assert table["classes"].tolist()[2] == 16 and 1 <= table["classes"].tolist()[1] <= 12
    clusters = json.loads((tmp_path / "cmp_clusters" / "clusters.json").read_text())
    assert table["ARI"].tolist()[1] == pytest.approx(clusters["ari"]) and table["ARI"].tolist()[2] == 1.0
    assert table[["R@1", "mMP@5"]].notna().all().all()
    expected_mib = class_centre_memory(16, 16, 3, sample_rate=0.5, optimizer="Adam", batch_size=16)["total"] / 2 ** 20
    assert table["class_centre_MiB"].tolist()[2] == pytest.approx(expected_mib)
    assert (tmp_path / "cmp_clusters" / "cluster_vs_zero_shot.csv").is_file()
    assert (tmp_path / "cmp_pseudo" / "checkpoints").is_dir() and (tmp_path / "cmp_supervised").is_dir()


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (two spin-waiting threads on a busy 2-core machine are 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mean_ari(embeddings, labels, num_clusters, seeds=(0, 1, 2)):
    return float(np.mean([adjusted_rand_index(labels, kmeans(embeddings, num_clusters, seed=s).labels)
                          for s in seeds]))


def test_features_trained_on_train_classes_cluster_held_out_classes_better(tmp_path, one_thread):
    """Fast variant: frozen random-init backbone, a 16-d neck trained with ArcFace on the train
    classes' features; held-out (test) classes cluster better than with the untrained neck."""
    import torch
    import torch.nn.functional as F

    from unifex_lib.cluster import extract_features
    from unifex_lib.data.annotations import read_annotations
    from unifex_lib.data.demo import generate_demo
    from unifex_lib.models import create_backbone, create_head, create_neck

    root = generate_demo(tmp_path / "demo", seed=0, train_classes=6, val_classes=1, test_classes=4,
                         images_per_class=4, size=32)
    table = read_annotations(root / "annotations.csv")
    train_rows, test_rows = table[table["split"] == "train"], table[table["split"] == "test"]
    torch.manual_seed(0)
    backbone = create_backbone("timm", "test_nfnet", pretrained=False, image_size=32)
    f_train = torch.from_numpy(extract_features(backbone, train_rows, root))
    f_test = torch.from_numpy(extract_features(backbone, test_rows, root))
    y_train = torch.as_tensor(pd.factorize(train_rows["label"], sort=True)[0])
    neck = create_neck("proj_layer", backbone.num_features, 16, dropout=0.0)
    head = create_head("ArcFace", int(y_train.max()) + 1, 16, k=1)

    def held_out_ari() -> float:
        with torch.no_grad():
            return _mean_ari(F.normalize(neck(f_test), dim=1).numpy(), test_rows["label"], 16)

    random_init = held_out_ari()
    optimizer = torch.optim.Adam([*neck.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(100):
        loss = head.loss(F.normalize(neck(f_train), dim=1), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = held_out_ari()
    print(f"held-out ARI (16 test classes): random-init {random_init:.3f}, trained on train classes {trained:.3f}")
    assert trained > random_init + 0.05


@pytest.mark.slow
def test_train_run_clusters_held_out_classes_better_than_random_init(tmp_path, one_thread):
    """Slow variant through train(): resnet10t fine-tuned end to end on the demo train classes."""
    import torch

    from unifex_lib.cluster import extract_features
    from unifex_lib.data.annotations import read_annotations
    from unifex_lib.data.demo import generate_demo
    from unifex_lib.models import create_model
    from unifex_lib.params import load_params
    from unifex_lib.train import load_checkpoint_model, train

    root = generate_demo(tmp_path / "demo", seed=0, train_classes=6, val_classes=2, test_classes=4,
                         images_per_class=4, size=32)
    test_rows = read_annotations(root / "annotations.csv").query("split == 'test'")
    params = load_params("params/demo.yaml", data_root=str(root), output_dir=str(tmp_path / "out"), run_name="sup",
                         backbone="resnet10t", image_size=32, freeze=False, feature_cache=False, embedding_dim=16,
                         iterations=40, checkpoint_every=40, batch_size=32, lr=2e-3, eta_min=1e-4,
                         warmup_iterations=2)
    torch.manual_seed(params.train.seed)
    random_init = create_model(params.model, image_size=32).eval()
    train(params)
    trained, _ = load_checkpoint_model(params.run_dir)
    aris = [_mean_ari(extract_features(m, test_rows, root), test_rows["label"], 16) for m in (random_init, trained)]
    print(f"held-out ARI: random-init {aris[0]:.3f}, trained {aris[1]:.3f}")
    assert aris[1] > aris[0] + 0.05


# ----------------------------------------------------------------------------- k-NN probe
def test_knn_predict_hand_worked():
    from unifex_lib.knn_probe import knn_predict

    train = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    votes = knn_predict(train, [0, 1, 1], np.array([[1, 0]], np.float32), num_classes=2, k=2, temperature=0.5)
    # neighbours: train 0 (s=1, class 0) and train 1 (s=0.8, class 1)
    np.testing.assert_allclose(votes, [[math.exp(1 / 0.5), math.exp(0.8 / 0.5)]], rtol=1e-6)


def test_knn_accuracy_matches_sklearn_1nn(tiny_demo, tmp_path, one_thread):
    import shutil

    import torch
    import torch.nn.functional as F
    from sklearn.neighbors import KNeighborsClassifier

    from unifex_lib.data.images import load_image
    from unifex_lib.knn_probe import knn_accuracy
    from unifex_lib.models import create_backbone
    from unifex_lib.uned import default_transform

    classes = sorted(p for p in (tiny_demo / "images").glob("*/*") if p.is_dir())
    for c in classes:  # ImageFolder pair: 2 images per class to train, 1 to val
        for i, image in enumerate(sorted(c.glob("*.png"))):
            dest = tmp_path / ("val" if i == 2 else "train") / f"{c.parent.name}_{c.name}" / image.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest)
    torch.manual_seed(0)
    model = create_backbone("timm", "test_vit", pretrained=False, image_size=32)
    result = knn_accuracy(model, tmp_path / "train", tmp_path / "val", k=1)
    assert (result["n_train"], result["n_val"], result["num_classes"]) == (72, 36, 36)

    transform = default_transform(model)

    def embed(split):
        files = sorted((tmp_path / split).glob("*/*.png"))
        with torch.no_grad():
            x = torch.stack([transform(load_image(f)) for f in files])
            return F.normalize(model(x), dim=1).numpy(), [f.parent.name for f in files]

    (xt, yt), (xv, yv) = embed("train"), embed("val")
    expected = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(xt, yt).score(xv, yv)
    assert result["top1"] == pytest.approx(expected)
    print(f"k-NN probe (1-NN) of a random-init test_vit on 36 demo classes: top-1 {result['top1']:.3f}")
