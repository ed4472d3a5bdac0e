"""Every notebook runs end to end under papermill, in the order `make demo` runs them,
on tiny demo data with a tiny model, and writes the files it promises."""
import json
import zipfile
from pathlib import Path

import pandas as pd
import papermill as pm
import pytest
import yaml

from unifex_lib.data.demo import generate_demo

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = {"backbone_type": "timm", "backbone": "resnet10t", "pretrained": False}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    data = generate_demo(root / "data", seed=0, train_classes=4, val_classes=2, test_classes=3,
                         images_per_class=3, size=32)
    params_file = root / "tiny.yaml"
    params_file.write_text(yaml.safe_dump({
        "base": str(REPO / "params" / "demo.yaml"),
        "output_dir": str(root / "outputs"),
        "data": {"data_root": str(data), "image_size": 32},
        "model": {**TINY_BACKBONE, "embedding_dim": 16},
        "train": {"epochs": 2, "batch_size": 16},
    }))
    return root, params_file


def run(workspace, notebook, **parameters):
    root, params_file = workspace
    out = root / "executed" / f"{notebook}.ipynb"
    out.parent.mkdir(exist_ok=True)
    pm.execute_notebook(str(REPO / "notebooks" / f"{notebook}.ipynb"), str(out), kernel_name="python3",
                        cwd=str(REPO), progress_bar=False,
                        parameters={"params_file": str(params_file), **parameters})
    return root / "outputs"


def test_committed_without_outputs():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} has outputs"


def test_pipeline(workspace):
    root, _ = workspace
    data = root / "data"
    out = run(workspace, "curate", data_root=str(data), run_name="nb/curate")
    assert (data / "train.csv").is_file() and (out / "nb" / "curate" / "class_sizes.png").is_file()

    out = run(workspace, "zero_shot", run_name="nb/zero_shot", image_size=32, cache_dir="",
              backbones=[{**TINY_BACKBONE, "neck": "pooling"}])
    zero = pd.read_csv(out / "nb" / "zero_shot" / "zero_shot_test.csv")
    assert {"glyphs", "shapes", "textures", "products", "mean"} <= set(zero.domain)

    out = run(workspace, "train", run_name="nb")
    evals = pd.read_csv(out / "nb" / "eval.csv")
    assert {"R@1", "mMP@5"} <= set(evals.columns) and len(evals.epoch.unique()) == 2
    assert (out / "nb" / "loss.png").is_file()

    out = run(workspace, "evaluate_uned", run_name="nb")
    table = pd.read_csv(out / "nb" / "uned" / "uned_test.csv")
    assert {"merged", "separate"} == set(table["mode"])
    assert list((out / "nb" / "uned").glob("*.png"))

    out = run(workspace, "kaggle_submission", run_name="nb")
    with zipfile.ZipFile(out / "nb" / "export" / "submission.zip") as z:
        assert z.namelist() == ["saved_model.pt"]
    assert (out / "nb" / "export" / "local_score.csv").is_file()

    out = run(workspace, "cluster", run_name="nb/cluster", num_clusters=12, supervised=False)
    table = pd.read_csv(out / "nb" / "cluster_clusters" / "cluster_vs_zero_shot.csv")
    assert len(table) == 2 and (out / "nb" / "cluster_clusters" / "cluster_sizes.png").is_file()
