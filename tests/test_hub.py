"""Model hub: available_models() lists zero-shot families, runs and exports; load() round-trips them."""
import subprocess
import sys

import pytest
import torch

import unifex_lib
from unifex_lib import hub

FAMILIES = ("clip", "clip_convnext", "clipav2", "dinov2", "eva02", "meta-clip", "sam", "siglip")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (two spin-waiting threads on a busy 2-core machine are 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_run(tiny_demo, tmp_path_factory, one_thread):
    """A tiny run trained end to end under a models directory, with the embeddings its model gave at
    the checkpoint, recorded inside train() (``evaluate`` runs right before the checkpoint is saved)."""
    from unifex_lib import train as train_module
    from unifex_lib.data.images import load_image
    from unifex_lib.data.transforms import create_transform
    from unifex_lib.params import load_params

    models_dir = tmp_path_factory.mktemp("models")
    images = [load_image(p) for p in sorted((tiny_demo / "images").glob("*/c0000/*.png"))[:4]]
    params = load_params("params/demo.yaml", data_root=str(tiny_demo), output_dir=str(models_dir), run_name="tiny",
                         backbone="test_vit", image_size=32, freeze=False, feature_cache=False, embedding_dim=16,
                         iterations=2, checkpoint_every=2, batch_size=16, eval_batch_size=64)
    recorded = []
    real_evaluate = train_module.evaluate

    def evaluate_and_record(p, model, device):
        model.eval()
        transform = create_transform(p.data.eval_transform, model.data_config)
        with torch.no_grad():
            recorded.append(model(torch.stack([transform(im) for im in images])).clone())
        return real_evaluate(p, model, device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "evaluate", evaluate_and_record)
        train_module.train(params)
    assert len(recorded) == 1
    return models_dir, images, recorded[0]


def _embed(model, transform, images):
    with torch.no_grad():
        return torch.cat([model(transform(im).unsqueeze(0)) for im in images])


def test_load_round_trips_a_trained_run(trained_run):
    models_dir, images, expected = trained_run
    for name, kwargs in (("tiny", {"models_dir": models_dir}), (models_dir / "tiny", {}),
                         (models_dir / "tiny" / "checkpoints" / "step_0000002.json", {})):
        model, transform = unifex_lib.load(name, **kwargs)
        assert not model.training
        torch.testing.assert_close(_embed(model, transform, images), expected, atol=1e-5, rtol=0)


def test_available_models_lists_families_runs_and_exports(trained_run, monkeypatch):
    from unifex_lib.export import export_guiec

    models_dir, images, expected = trained_run
    assert unifex_lib.available_models(models_dir=models_dir) == [f"zero-shot/{f}" for f in FAMILIES] + ["tiny"]
    monkeypatch.setenv("UNIFEX_MODELS_DIR", str(models_dir))
    assert unifex_lib.available_models("t*") == ["tiny"]

    model, _ = unifex_lib.load("tiny")
    config = model.data_config
    export_guiec(model, models_dir / "tiny" / "export" / "saved_model.pt", config["input_size"][-1], config["mean"],
                 config["std"], verify=False)
    assert unifex_lib.available_models("*.pt") == ["tiny/export/saved_model.pt"]
    exported, transform = unifex_lib.load("tiny/export/saved_model.pt")
    assert transform(images[0]).dtype == torch.uint8  # native-size uint8: resizing happens inside
    torch.testing.assert_close(_embed(exported, transform, images), expected, atol=1e-4, rtol=0)


def test_unknown_name_lists_the_available_ones(trained_run):
    models_dir = trained_run[0]
    with pytest.raises(ValueError) as err:
        hub.load("tiyn", models_dir=models_dir)
    message = str(err.value)
    assert "unknown model 'tiyn' (did you mean 'tiny'?)" in message
    assert "available: zero-shot/clip, zero-shot/clip_convnext" in message and ", tiny" in message
    with pytest.raises(ValueError, match="unknown model 'zero-shot/sigclip'"):
        hub.load("zero-shot/sigclip", models_dir=models_dir)


def test_zero_shot_load_uses_the_pooling_neck():
    model, transform = unifex_lib.load("zero-shot/dinov2", pretrained=False, backbone="test_vit", image_size=32,
                                       embedding_dim=16)
    from PIL import Image

    image = Image.new("RGB", (40, 48), (200, 30, 90))
    x = transform(image).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        features = model.backbone(x)
        out = model(x)
    # pooling neck: mean of consecutive groups of 64 / 16 = 4 features, then L2 normalisation
    pooled = features.view(1, 16, 4).mean(-1)
    torch.testing.assert_close(out, pooled / pooled.norm(dim=1, keepdim=True))


def test_import_unifex_lib_stays_light():
    """``import unifex_lib`` and reaching ``unifex_lib.load`` import neither torch nor the model code."""
    code = ("import sys, unifex_lib; assert 'torch' not in sys.modules, 'import unifex_lib imported torch'; "
            "assert callable(unifex_lib.load) and callable(unifex_lib.available_models); "
            "assert 'torch' not in sys.modules, 'unifex_lib.hub imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
