"""GUIEC export: scripted/traced model, torch-only reload, parity, D limit, local scorer, fixture builder."""
import hashlib
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unifex_lib import export as E
from unifex_lib.data.transforms import create_transform
from unifex_lib.retrieval import evaluate

SIZE, MEAN, STD = 32, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


class TinyBackbone(nn.Module):
    """Scriptable stand-in for a create_backbone() module: [B,3,S,S] normalised -> [B,8]."""
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


class TraceOnlyBackbone(TinyBackbone):
    """Varargs forward: torch.jit.script refuses it, torch.jit.trace handles it."""

    def forward(self, *inputs):
        return self.conv(inputs[0]).relu().flatten(2).mean(-1)


class TinyEmbeddingModel(nn.Module):
    """Stand-in for unifex_lib.models.EmbeddingModel: backbone + neck + L2 normalise."""

    def __init__(self, backbone: nn.Module, dim: int = 16):
        super().__init__()
        self.backbone, self.neck, self.embedding_dim = backbone, nn.Linear(backbone.num_features, dim), dim
        self.data_config = {"input_size": (3, SIZE, SIZE), "mean": MEAN, "std": STD}

    def forward(self, x):
        return F.normalize(self.neck(self.backbone(x)), dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyEmbeddingModel(TinyBackbone()).eval()
    info = E.export_submission(model, tmp_path_factory.mktemp("export"))
    return model, info


def test_export_scripted_parity_and_zip(exported):
    model, info = exported
    assert info["backbone"] == "script" and info["embedding_dim"] == 16
    parity = info["parity"]
    odd = parity[(parity["height"] % 2 == 1) | (parity["width"] % 2 == 1)]
    assert len(odd) >= 10 and {"L", "RGBA", "P", "CMYK"} <= set(parity["mode"])
    assert parity["max_abs_diff"].max() <= 1e-4 and parity["cosine"].min() > 1 - 1e-6
    with zipfile.ZipFile(info["zip_path"]) as archive:
        assert archive.namelist() == ["saved_model.pt"]
    assert {"aten::_upsample_bicubic2d_aa", "aten::conv2d"} <= set(info["ops"])


def test_saved_file_names_no_op_newer_than_torch_1_11(exported):
    assert exported[1]["ops_newer_than_1_11"] == []


def test_saved_file_runs_with_only_torch(exported):
    _, info = exported
    report = E.verify_in_subprocess(info["path"], 16, sizes=[(1, 1), (301, 7)])
    assert report["foreign_modules"] == []
    assert [o["shape"] for o in report["outputs"]] == [[1, 16], [1, 16]]


@pytest.mark.parametrize("h,w", [(1, 1), (5, 300), (333, 17), (32, 32), (47, 61)])
def test_uint8_any_size_gives_float32_1xD(exported, h, w):
    _, info = exported
    model = E.load_exported(info["path"])
    x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
    y = model(x)
    assert y.dtype == torch.float32 and y.shape == (1, 16)
    assert torch.allclose(y.norm(dim=1), torch.ones(1), atol=1e-5)
    assert torch.equal(model(x.float()), y)  # float 0-255 input is the same image


def test_eager_pipeline_matches_an_independent_preprocessing(exported):
    """Second implementation of the scorer path: torchvision resize + crop, then the eager model."""
    from torchvision.transforms import v2 as T
    model, info = exported
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 71, 3), dtype=np.uint8))
    x = T.functional.center_crop(T.functional.resize(E.scorer_tensor(image).float(), SIZE, antialias=True,
                                                     interpolation=T.InterpolationMode.BICUBIC).clamp(0, 255), SIZE)
    x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(E.load_exported(info["path"])(E.scorer_tensor(image)), model(x), atol=1e-4)


def test_traced_backbone_fallback(tmp_path):
    torch.manual_seed(0)
    model = TinyEmbeddingModel(TraceOnlyBackbone()).eval()
    info = E.export_guiec(model, tmp_path / "m.pt", SIZE, MEAN, STD, mode="squash", verify=False)
    assert info["backbone"] == "trace" and info["neck"] == "script"
    exported = E.load_exported(tmp_path / "m.pt")
    table = E.parity_check(exported, model, create_transform("squash", size=SIZE, mean=MEAN, std=STD))
    assert table["max_abs_diff"].max() <= 1e-4
    assert exported(torch.zeros(3, 3, 20, 90, dtype=torch.uint8)).shape == (3, 16)


def test_embedding_wider_than_64_is_refused(tmp_path):
    model = TinyEmbeddingModel(TinyBackbone(), dim=65)
    with pytest.raises(E.ExportError, match=r"embedding_dim=65 exceeds the GUIEC limit max_dim=64"):
        E.export_submission(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_parity_failure_is_reported(exported):
    model, info = exported
    wrong = create_transform("squash", size=SIZE, mean=MEAN, std=STD)  # export used center_crop
    with pytest.raises(E.ExportError, match="parity check failed: max \\|delta\\|"):
        E.parity_check(E.load_exported(info["path"]), model, wrong)


def test_mean_precision_hand_worked():
    solution = pd.DataFrame({"id": ["q1", "q2", "q3"], "Usage": ["Public", "Private", "Public"],
                             "relevant": [["a", "b"], list("abcdef"), ["c"]]})
    predictions = {"q1": ["a", "a", "b", "c", "d"],  # n=2: [a, a] -> the duplicate counts once: 1/2
                   "q2": ["x", "a", "b", "y", "c"],  # n=6 -> 5 slots, 3 relevant: 3/5
                   "q3": ["c", "x", "y", "z", "w"]}  # n=1: 1/1
    table = E.mean_precision_at_k(predictions, solution).set_index("Usage")
    assert table.loc["all", "mMP@5"] == pytest.approx(0.7)
    assert table.loc["Public", "mMP@5"] == pytest.approx(0.75) and table.loc["Private", "mMP@5"] == pytest.approx(0.6)
    assert table.loc["all", "n_queries"] == 3


def _solid(path, value, size, mode="RGB"):
    Image.new(mode, size, value if mode == "L" else (value, 50, 90)).save(path)


def test_local_scorer_hand_worked(tmp_path):
    """Embedding = mean red value, so neighbours are worked out by hand on a line."""
    (tmp_path / "query").mkdir(), (tmp_path / "index").mkdir()
    for value, size in [(0, (20, 30)), (10, (20, 30)), (20, (33, 7)), (30, (20, 30)), (40, (9, 9)),
                        (200, (20, 30)), (210, (64, 50))]:
        _solid(tmp_path / "index" / f"i{value}.png", value, size)
    _solid(tmp_path / "query" / "qa.png", 1, (15, 15))
    _solid(tmp_path / "query" / "qb.png", 207, (15, 15))
    _solid(tmp_path / "query" / "qc.png", 24, (11, 40), mode="L")  # grayscale source, converted by PIL
    E.write_solution([("qa", ["i0", "i200"], "Public"),  # preds i0 i10 | i20 i30 i40 -> 1/2
                      ("qb", ["i210", "i40", "i30", "i0", "i20", "i10"], "Private"),  # i210 i200 i40 i30 i20 -> 4/5
                      ("qc", ["i30"], "Public")], tmp_path / "solution.csv")  # i20 | ... -> 0/1

    def red_mean(x):
        return x.float().mean(dim=(2, 3))[:, :1]

    for batched in (False, True):
        table, predictions = E.local_score(red_mean, tmp_path, batched=batched)
        table = table.set_index("Usage")
        assert predictions["qb"] == ["i210", "i200", "i40", "i30", "i20"]
        assert predictions["qc"] == ["i20", "i30", "i10", "i40", "i0"]
        assert table.loc["all", "mMP@5"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
        assert table.loc["Public", "mMP@5"] == pytest.approx(0.25) and table.loc["Private", "mMP@5"] == pytest.approx(0.8)


def test_build_fixture_from_split_files_and_score(tmp_path, exported):
    root = tmp_path / "data"
    items = []
    for cls, n in [(0, 3), (1, 2), (2, 1)]:
        for i in range(n):
            path = f"d1/{cls}/{i}.png"
            (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            _solid(root / "images" / path, 60 * cls + 5 * i, (30 + i, 20))
            items.append({"path": path, "class_id": cls})
    (root / "info_files" / "d1").mkdir(parents=True)
    (root / "info_files" / "d1" / "test.json").write_text(json.dumps(items))
    solution = E.build_guiec_fixture(root, tmp_path / "guiec")
    assert len(solution) == 2  # the single-image class only feeds the index
    assert sorted(solution["relevant"].map(len)) == [1, 2]
    assert sorted(solution["Usage"]) == ["Private", "Public"]
    assert len(list((tmp_path / "guiec" / "query").iterdir())) == 2
    assert len(list((tmp_path / "guiec" / "index").iterdir())) == 4
    model = E.load_exported(exported[1]["path"])
    table, _ = E.local_score(model, tmp_path / "guiec")
    # second implementation: the library's UnED evaluation (inner-product kNN) on the same embeddings
    label = {hashlib.sha1(f"d1/{item['path']}".encode()).hexdigest()[:16]: item["class_id"] for item in items}
    (q_ids, q), (i_ids, x) = (E.embed_folder(model, tmp_path / "guiec" / sub) for sub in ("query", "index"))
    expected = evaluate(q.numpy(), x.numpy(), [label[i] for i in q_ids], [label[i] for i in i_ids], ["mMP@5"],
                        backend="torch")
    assert table["mMP@5"].iloc[0] == pytest.approx(expected["mMP@5"]) and table["n_queries"].iloc[0] == 2


def test_solution_without_relevant_images_is_an_error(tmp_path):
    (tmp_path / "s.csv").write_text("id,expected,Usage\nq1,,Public\n")
    with pytest.raises(ValueError, match=r"q1.*no relevant index image"):
        E.read_solution(tmp_path / "s.csv")


def test_real_timm_vit_exports_and_flags_newer_ops(tmp_path):
    """A registry model (timm test_vit, random init): scripts, matches eager, uses no fused SDPA (absent in
    torch 1.11), and the file format version of a GELU model is reported."""
    from unifex_lib.models import create_model
    from unifex_lib.params import load_params
    p = load_params(backbone_type="timm", backbone="test_vit", pretrained=False, image_size=32, embedding_dim=32)
    model = create_model(p.model, image_size=32).eval()
    config = model.data_config
    info = E.export_guiec(model, tmp_path / "m.pt", 32, config["mean"], config["std"], verify=False)
    assert (info["backbone"], info["neck"], info["embedding_dim"]) == ("script", "script", 32)
    assert "aten::scaled_dot_product_attention" not in info["ops"]
    assert "aten::softmax" in info["ops"]
    assert info["file_format_version"] == 10  # the gelu(approximate=...) bump of Feb 2022, after torch 1.11
