"""Backbone families (tiny models through each family's code path), necks, freezing, the embedding model."""
import json
import os

import open_clip
import pytest
import safetensors.torch
import timm
import torch

from unifex_lib.models import EmbeddingModel, create_backbone, create_model, create_neck, list_backbones, list_necks
from unifex_lib.models.backbones import default_backbone
from unifex_lib.params import ModelParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}
TINY_OPEN_CLIP = {  # configs with each open_clip family's tower structure, at toy width
    "unifex-tiny-clip": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                                         "head_width": 16, "patch_size": 8}},
    "unifex-tiny-metaclip": {"embed_dim": 24, "quick_gelu": True,
                             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                            "patch_size": 8}},
    "unifex-tiny-clipa": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                                          "patch_size": 8, "no_ln_pre": True, "pool_type": "avg",
                                                          "final_ln_after_pool": True}},
    "unifex-tiny-convnext": {"embed_dim": 24, "vision_cfg": {"timm_model_name": "test_convnext",
                                                             "timm_model_pretrained": False, "timm_pool": "",
                                                             "timm_proj": "linear", "image_size": 32}},
}
# type, name, library kwargs, image size, pooled width
FAMILIES = [
    ("clip", "unifex-tiny-clip", {}, 32, 32),
    ("meta-clip", "unifex-tiny-metaclip", {}, 32, 32),
    ("clipav2", "unifex-tiny-clipa", {}, 32, 32),
    ("clip_convnext", "unifex-tiny-convnext", {}, 32, None),
    ("open_clip", "unifex-tiny-clip", {}, 32, 32),
    ("eva02", "eva02_base_patch16_clip_224", TINY_VIT, 32, 32),
    ("siglip", "vit_base_patch16_siglip_224", TINY_VIT, 32, 32),
    ("dinov2", "vit_small_patch14_dinov2", TINY_VIT, 28, 32),
    ("sam", "samvit_base_patch16", dict(TINY_VIT, global_attn_indexes=[1], window_size=2, neck_chans=16), 32, 32),
    ("timm", "resnet10t", {}, 32, 512),
]


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY_OPEN_CLIP.items():
        (folder / f"{name}.json").write_text(json.dumps(dict(cfg, text_cfg=TINY_TEXT)))
    open_clip.add_model_config(folder)


def reference_weights(type, name, kwargs, size, path):
    """A random model in the library's own checkpoint format, saved to ``path``; returns its state dict."""
    if type in ("clip", "meta-clip", "clipav2", "clip_convnext", "open_clip"):
        model = open_clip.create_model(name)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, path)
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}, model.encode_image
    model = timm.create_model(name, img_size=size, **kwargs) if kwargs else timm.create_model(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return state, model


def test_registry_lists_every_family():
    assert set(list_backbones()) == {"clip", "clip_convnext", "clipav2", "eva02", "meta-clip", "siglip", "dinov2",
                                     "sam", "timm", "open_clip"}
    for type in list_backbones():
        name, tag = default_backbone(type)
        if name is None:
            continue
        if type in ("eva02", "siglip", "dinov2", "sam"):
            assert f"{name}.{tag}" in timm.list_pretrained(name + "*")
        else:
            assert (name, tag) in open_clip.list_pretrained()


@pytest.mark.parametrize("type,name,kwargs,size,width", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_forward_backward_and_weights_file(type, name, kwargs, size, width, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / ("weights.pt" if "tiny" in name else "weights.safetensors")
    state, reference = reference_weights(type, name, kwargs, size, path)
    backbone = create_backbone(type, name, pretrained=str(path), image_size=size, freeze=False, **kwargs)
    assert backbone.data_config["input_size"] == (3, size, size)
    assert backbone.model_id.startswith(("timm:", "open_clip:")) and "file-" in backbone.model_id
    # every parameter came from the file through the library's loader
    for key, value in backbone.model.state_dict().items():
        if key in state:
            torch.testing.assert_close(value, state[key])
    assert sum(key in state for key in backbone.model.state_dict()) >= len(list(backbone.model.parameters()))
    x = torch.randn(2, 3, size, size)
    features = backbone.train()(x)
    assert features.shape == (2, width or backbone.num_features) and features.shape[1] == backbone.num_features
    features.square().mean().backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
    if type in ("clip", "open_clip"):  # the projected feature is the library's image embedding
        projected = create_backbone(type, name, pretrained=str(path), feature="projected").eval()
        torch.testing.assert_close(projected(x), reference(x))
    if type == "eva02":
        projected = create_backbone(type, name, pretrained=str(path), feature="projected", image_size=size,
                                    **kwargs).eval()
        torch.testing.assert_close(projected(x), reference.eval()(x))


def test_data_config_comes_from_the_library():
    backbone = create_backbone("timm", "test_vit", image_size=32)
    cfg = timm.models.get_pretrained_cfg("test_vit.r160_in1k")
    assert backbone.data_config["mean"] == tuple(cfg.mean) and backbone.data_config["std"] == tuple(cfg.std)
    assert backbone.data_config["interpolation"] == cfg.interpolation
    native = create_backbone("timm", "test_vit")
    assert native.data_config["input_size"] == tuple(cfg.input_size)
    clip = create_backbone("clip", "unifex-tiny-clip")
    assert clip.data_config["input_size"] == (3, 32, 32)


def test_offline_missing_weights_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for type in ("siglip", "clip", "dinov2"):
        with pytest.raises(RuntimeError, match="offline.*pretrained=<path"):
            create_backbone(type, pretrained=True)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_backbone("timm", "test_vit", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown timm pretrained tag"):
        create_backbone("timm", "test_vit", pretrained="no_such_tag")


def test_errors_name_valid_choices():
    with pytest.raises(ValueError, match="choose one of .*siglip"):
        create_backbone("siglp")
    with pytest.raises(ValueError, match="pooled, projected"):
        create_backbone("timm", "test_vit", feature="cls")
    with pytest.raises(ValueError, match="no projection head"):
        create_backbone("siglip", "vit_base_patch16_siglip_224", feature="projected", image_size=32, **TINY_VIT)
    with pytest.raises(ValueError, match="needs a model name"):
        create_backbone("timm")
    with pytest.raises(ValueError, match="choose one of pooling, proj_layer"):
        create_neck("mlp", 8, 4)


def test_freeze_policies_and_counts():
    total = sum(p.numel() for p in timm.create_model("test_vit", num_classes=0).parameters())
    frozen = create_backbone("timm", "test_vit", freeze=True)
    assert frozen.param_counts() == {"total": total, "trainable": 0}
    frozen.train()
    assert not frozen.model.training  # a fully frozen backbone stays in eval mode
    assert create_backbone("timm", "test_vit", freeze=False).param_counts()["trainable"] == total
    last = create_backbone("timm", "test_vit", freeze="last_n_blocks:1")
    names = [n for n, _ in last.model.named_parameters()]
    last_block = f"blocks.{len(last.model.blocks) - 1}."
    before = ("blocks.", "cls_token", "pos_embed", "patch_embed", "reg_token")  # stem and earlier blocks
    expected = {n for n in names if n.startswith(last_block) or not n.startswith(before)}
    trainable = {n for n, p in last.model.named_parameters() if p.requires_grad}
    assert trainable == expected and any(n.startswith("norm") for n in trainable)
    assert last.param_counts()["trainable"] == sum(p.numel() for n, p in last.model.named_parameters()
                                                   if n in trainable)
    clip = create_backbone("clip", "unifex-tiny-clip", freeze="last_n_blocks:1")
    assert {n for n, p in clip.model.named_parameters() if p.requires_grad} == \
        {n for n, _ in clip.model.named_parameters() if n.startswith(("transformer.resblocks.1.", "ln_post."))}
    resnet = create_backbone("timm", "resnet10t", freeze="last_n_blocks:1")
    assert all(p.requires_grad == n.startswith(("layer4.", "fc.")) for n, p in resnet.model.named_parameters())
    with pytest.raises(ValueError, match="only 2 blocks"):
        create_backbone("clip", "unifex-tiny-clip", freeze="last_n_blocks:3")
    with pytest.raises(ValueError, match="last_n_blocks:N"):
        create_backbone("timm", "test_vit", freeze="last_3")


def test_necks():
    assert list_necks() == ["pooling", "proj_layer"]
    x = torch.arange(1.0, 9.0).unsqueeze(0)
    torch.testing.assert_close(create_neck("pooling", 8, 4)(x), torch.tensor([[1.5, 3.5, 5.5, 7.5]]))
    proj = create_neck("proj_layer", 8, 3, dropout=0.2)
    assert proj(x).shape == (1, 3) and proj.dropout.p == 0.2
    with pytest.raises(ValueError, match="cannot widen"):
        create_neck("pooling", 4, 8)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("neck", ["proj_layer", "pooling"])
def test_embedding_model(neck):
    params = ModelParams(backbone_type="timm", backbone="test_vit", pretrained=False, neck=neck, embedding_dim=8,
                         freeze=True)
    model = create_model(params, image_size=32).eval()
    assert isinstance(model, EmbeddingModel) and model.embedding_dim == 8
    assert model.data_config["input_size"] == (3, 32, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = model(x)
    assert e.dtype == torch.float32 and e.shape == (3, 8)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model(x), model.embed_features(model.backbone(x)))
    traced = torch.jit.trace(model, x[:1], check_trace=False)  # the export path
    torch.testing.assert_close(traced(x), model(x))
    counts = model.param_counts()
    assert counts["trainable"] == sum(p.numel() for p in model.neck.parameters())
    assert counts["total"] == model.backbone.param_counts()["total"] + counts["trainable"]


@pytest.mark.slow
@pytest.mark.parametrize("type", ["clip", "clip_convnext", "clipav2", "eva02", "meta-clip", "siglip", "dinov2", "sam"])
def test_full_size_defaults_random_init(type):
    expected = {  # (pooled width, input side) of the default weights
        "clip": (1280, 224), "clip_convnext": (1024, 256), "clipav2": (1280, 224), "eva02": (1024, 224),
        "meta-clip": (1280, 224), "siglip": (1152, 384), "dinov2": (1024, 518), "sam": (768, 1024)}
    backbone = create_backbone(type, pretrained=False)
    assert (backbone.num_features, backbone.data_config["input_size"][1]) == expected[type]
    side = backbone.data_config["input_size"][1]
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, side, side)).shape == (1, expected[type][0])
