"""Parameter loading, merging and validation: every bad value gets an error that names it."""
from pathlib import Path

import pytest

from unifex_lib.params import (FLAT_NAMES, ParamsError, Params, from_notebook, load_params, save_params)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_recipe():
    p = load_params(REPO / "params" / "default.yaml")
    assert (p.model.backbone_type, p.model.embedding_dim, p.model.freeze) == ("siglip", 64, True)
    assert (p.head.head, p.head.k, p.head.s, p.head.m) == ("ArcFace", 3, 30.0, 0.5)
    assert (p.train.optimizer, p.train.lr, p.train.eta_min, p.train.batch_size, p.train.epochs, p.train.seed) == \
        ("Adam", 0.02, 0.001, 128, 10, 42)


def test_base_file_then_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {REPO / 'params' / 'default.yaml'}\nhead:\n  k: 1\ntrain:\n  lr: 0.5\n")
    p = load_params(child, lr=0.1, head="CosFace")
    assert (p.head.k, p.train.lr, p.head.head, p.model.backbone_type) == (1, 0.1, "CosFace", "siglip")
    assert isinstance(load_params(None, s=64).head.s, float)  # ints widen to float fields


def test_save_and_load_round_trip(tmp_path):
    p = load_params(REPO / "params" / "demo.yaml", k=5, eval_domains=["glyphs"])
    save_params(p, tmp_path / "p.yaml")
    assert load_params(tmp_path / "p.yaml") == p


@pytest.mark.parametrize("overrides, named", [
    ({"k": 0}, "k=0 must be >= 1"),
    ({"s": 0.0}, "s=0.0 must be > 0"),
    ({"s": -1}, "s=-1.0 must be > 0"),
    ({"embedding_dim": 0}, "embedding_dim=0 must be >= 1"),
    ({"optimizer": "Adamw"}, "optimizer='Adamw' is not valid (did you mean 'AdamW'?); choose one of Adam, AdamW, SGD"),
    ({"lr": "fast"}, "lr='fast' has type str, expected float"),
    ({"k": 2.5}, "k=2.5 has type float, expected int"),
    ({"k": True}, "k=True has type bool, expected int"),
    ({"freeze": "last_blocks:2"}, "freeze='last_blocks:2' must be true, false or 'last_n_blocks:N'"),
    ({"sample_rate": 1.5}, "sample_rate=1.5 must be in (0, 1]"),
    ({"m_min": 0.6, "m_max": 0.5}, "m_min=0.6, m_max=0.5"),
    ({"precision": "fp8"}, "precision='fp8' is not valid"),
    ({"sam": True, "optimizer": "SGD"}, "sam=True needs optimizer Adam or AdamW"),
    ({"run_name": "../elsewhere"}, "run_name='../elsewhere' must be a non-empty relative folder name"),
    ({"hed": "ArcFace"}, "unknown parameter 'hed' (did you mean 'head'?)"),
])
def test_bad_values_are_named(overrides, named):
    with pytest.raises(ParamsError) as err:
        load_params(None, **overrides)
    assert named in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ParamsError) as err:
        load_params(None, k=0, s=-2, batch_size=0)
    assert all(n in str(err.value) for n in ("k=0", "s=-2.0", "batch_size=0"))


def test_unknown_registry_names_list_the_valid_ones():
    pytest.importorskip("unifex_lib.models")
    from unifex_lib.models import list_backbones, list_heads

    with pytest.raises(ParamsError) as err:
        load_params(None, head="ArcFce", backbone_type="sigclip")
    msg = str(err.value)
    assert "head='ArcFce' is not valid (did you mean 'ArcFace'?)" in msg and ", ".join(list_heads()) in msg
    assert "backbone_type='sigclip'" in msg and ", ".join(list_backbones()) in msg


def test_file_errors_name_the_place(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("head:\n  lr: 0.1\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert "unknown parameter 'head.lr' (it belongs to section 'train')" in str(err.value)
    assert "unknown parameter 'train.lrr' (did you mean 'lr'?)" in str(err.value)


def test_notebook_namespace():
    import math

    ns = {"params_file": str(REPO / "params" / "demo.yaml"), "head": "CosFace", "k": 1, "backbones": [],
          "math": math, "load": load_params, "In": [], "_private": 1}
    p = from_notebook({**ns, "lr": None}, notebook_params=("backbones",))
    assert (p.head.head, p.head.k, p.model.backbone) == ("CosFace", 1, "resnet18")
    assert p.train.lr == load_params(ns["params_file"]).train.lr == 0.002  # None: the file's value
    with pytest.raises(ParamsError) as err:
        from_notebook({**ns, "hed": "ArcFace", "k": 0}, notebook_params=("backbones",))
    assert err.value.problems == ["unknown parameter 'hed' (did you mean 'head'?)",
                                  "k=0 must be >= 1 (sub-centres per class)"]


def test_flat_names_cover_every_field():
    p = Params()
    assert set(p.flat()) == set(FLAT_NAMES)


def test_eval_root_falls_back_to_data_root():
    assert load_params(None, data_root="d").eval_root == Path("d")
    assert load_params(None, data_root="d", eval_root="u").eval_root == Path("u")
    assert load_params(REPO / "params" / "default.yaml").eval_root == Path("data/uned")
