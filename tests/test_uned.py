"""The UnED protocol: split rules, merged vs separate relevance, n_q, extraction and its cache."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unifex_lib.data.annotations import write_split_file
from unifex_lib.uned import (UNED_DOMAINS, evaluate_embeddings, evaluate_uned, extract_embeddings, list_domains,
                             load_split, query_index_splits)


def test_query_index_rules():
    test = {d: query_index_splits(d, "test") for d in UNED_DOMAINS}
    assert test == {"cars": ("test", "test"), "sop": ("test", "test"), "inshop": ("test", "index"),
                    "inat": ("test", "test"), "met": ("test", "index"), "gldv2": ("test", "index"),
                    "food2k": ("test", "test"), "rp2k": ("test", "test")}
    val = {d: query_index_splits(d, "val") for d in UNED_DOMAINS}
    assert val["met"] == ("val", "small_index")
    assert all(v == ("val", "val") for d, v in val.items() if d != "met")
    assert query_index_splits("glyphs", "test") == ("test", "test")  # non-UnED domains: leave-one-out
    with pytest.raises(ValueError, match="split='train' is not valid; choose one of test, val"):
        query_index_splits("cars", "train")


def at(*degrees):
    a = np.radians(degrees)
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# cars (test = index, leave-one-out) and inshop (test queries, separate index) on a circle
EMB = {("cars", "test"): at(0, 20, 90), ("inshop", "test"): at(5, 180),
       ("inshop", "index"): at(45, 170, 200, 260)}
LABELS = {("cars", "test"): [0, 0, 1], ("inshop", "test"): [0, [1, 2]], ("inshop", "index"): [0, 2, 1, 3]}


def test_merged_vs_separate_hand_worked():
    t = evaluate_embeddings(EMB, LABELS, ["cars", "inshop"], "test", "both", ["R@1", "mMP@5", "mAP@5"])
    t = t.set_index(["mode", "domain"])
    # cars: c0 -> c1 and c1 -> c0 are hits (n_q = 2 - 1 = 1); c2 is class 1's only image: n_q = 0
    for mode in ("merged", "separate"):
        assert t.loc[(mode, "cars"), ["R@1", "mMP@5", "n_queries", "n_q0"]].tolist() == [1, 1, 3, 1]
    # inshop q0 (5 deg, class 0): in merged mode its nearest neighbour is cars c0 (class 0 of
    # another domain: not relevant), the inshop class-0 item is 3rd; in separate mode it is 1st.
    # q1 (classes [1, 2]): n_q = 1 + 1 = 2, neighbours 170 (class 2), 200 (class 1) in both modes.
    merged, separate = t.loc[("merged", "inshop")], t.loc[("separate", "inshop")]
    assert (merged["R@1"], merged["mMP@5"], merged["mAP@5"]) == pytest.approx((0.5, 0.5, (1 / 3 + 1) / 2))
    assert (separate["R@1"], separate["mMP@5"], separate["mAP@5"]) == (1, 1, 1)
    assert merged["n_index"] == 7 and separate["n_index"] == 4 and t.loc[("separate", "cars"), "n_index"] == 3
    # headline: unweighted mean over domains
    assert t.loc[("merged", "mean"), "R@1"] == pytest.approx(0.75)
    assert t.loc[("separate", "mean"), ["R@1", "n_queries", "n_index", "n_q0"]].tolist() == [1, 5, 7, 1]


class MeanColour(torch.nn.Module):
    """Stand-in embedding model: per-channel mean of the image through a 3x3 linear map."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3, bias=False)
        torch.nn.init.eye_(self.proj.weight)
        self.data_config = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=1)


COLOURS = {0: (250, 20, 20), 1: (20, 250, 20), 2: (20, 20, 250)}


def write_demo_like(root, domains=("glyphs", "shapes"), per_class=3):
    """Two demo-style domains: solid images of 3 colour classes, split files for test and val."""
    rng = np.random.default_rng(0)
    for d in domains:
        for split in ("test", "val"):
            items = []
            for c, colour in COLOURS.items():
                for i in range(per_class):
                    path = f"{d}/{split}/{c}_{i}.png"
                    img = np.clip(np.array(colour) + rng.integers(-15, 15, size=(20, 24, 3)), 0, 255)
                    (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img.astype(np.uint8)).save(root / "images" / path)
                    items.append({"path": path, "class_id": c})
            write_split_file(items, root / "info_files" / d / f"{split}.json")


def test_evaluate_uned_end_to_end_with_cache(tmp_path):
    write_demo_like(tmp_path)
    model = MeanColour()
    assert list_domains(tmp_path) == ["glyphs", "shapes"]
    table = evaluate_uned(model, tmp_path, mode="both", batch_size=4, cache_dir=tmp_path / "cache")
    assert list(table.columns) == ["mode", "domain", "R@1", "mMP@5", "n_queries", "n_index", "n_q0"]
    assert table["domain"].tolist() == ["glyphs", "shapes", "mean"] * 2
    # colour classes are separable within a domain; in merged mode the other domain's same colour
    # (same class id, other domain) outranks some of them, so mMP@5 drops below 1 there
    sep = table[table["mode"] == "separate"].set_index("domain")
    assert (sep["R@1"] == 1).all() and (sep["mMP@5"] == 1).all() and (sep.loc["mean", "n_queries"] == 18)
    merged = table[table["mode"] == "merged"].set_index("domain")
    assert merged.loc["mean", "n_index"] == 18 and merged.loc["mean", "mMP@5"] < 1
    calls = model.calls
    again = evaluate_uned(model, tmp_path, mode="both", batch_size=4, cache_dir=tmp_path / "cache")
    assert model.calls == calls  # every split read from the cache
    pd.testing.assert_frame_equal(table, again)
    with torch.no_grad():
        model.proj.weight.mul_(-1)  # other weights -> other cache key -> extracted again
    evaluate_uned(model, tmp_path, domains=["glyphs"], split="val", cache_dir=tmp_path / "cache")
    assert model.calls > calls


def test_extraction_in_file_order(tmp_path):
    write_demo_like(tmp_path, domains=("glyphs",))
    from unifex_lib.uned import default_transform

    model = MeanColour()
    items = load_split(tmp_path, "glyphs", "test")
    transform = default_transform(model)
    emb = extract_embeddings(model, items[::-1], tmp_path / "images", transform, batch_size=2)
    direct = torch.stack([transform(Image.open(tmp_path / "images" / it["path"]).convert("RGB"))
                          for it in items[::-1]])
    np.testing.assert_allclose(emb, model(direct).detach().numpy(), atol=1e-5)
    assert model.training  # restored


def test_zero_shot_is_incremental_and_plots(tiny_demo, tmp_path, monkeypatch):
    import unifex_lib.uned as uned
    from unifex_lib.params import load_params

    params = load_params("params/demo.yaml", data_root=str(tiny_demo), image_size=32, eval_batch_size=64)
    configs = [{"backbone_type": "timm", "backbone": "resnet10t", "pretrained": False, "neck": "pooling",
                "embedding_dim": 32, "name": "r10t"}]
    table = uned.zero_shot(configs, params, tmp_path, mode="separate")
    assert (tmp_path / "backbones" / "r10t_test_separate.csv").is_file()
    assert table["model"].unique().tolist() == ["r10t"] and table["domain"].iloc[-1] == "mean"
    monkeypatch.setattr(uned, "evaluate_uned", lambda *a, **k: pytest.fail("re-run must read the saved table"))
    again = uned.zero_shot(configs, params, tmp_path, mode="separate")
    pd.testing.assert_frame_equal(table, again, check_dtype=False)
    with pytest.raises(ValueError, match="neck='poolng' is not valid"):
        uned.zero_shot([{"backbone_type": "timm", "backbone": "resnet10t", "neck": "poolng"}], params, tmp_path)
    png = uned.plot_bars(table, "mMP@5", tmp_path / "bars.png", mode="separate")
    assert png.stat().st_size > 1000
