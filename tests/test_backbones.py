"""Tests of redi.core.backbones: real weights, shapes, strides, freezing, weight-file handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from redi.core.backbones import (
    Backbone,
    BackboneOutput,
    backbone_names,
    build_backbone,
    build_classifier,
    map_state_dict_in_order,
)
from redi.core.errors import ConfigError, InputError, WeightsError
from redi.core.images import preprocess

LITE_CHANNELS = {"efficientnet_lite0": (24, 40, 112), "efficientnet_lite2": (24, 48, 120)}
CAT_CLASSES = range(281, 286)  # ImageNet 281-285 are domestic cats; 285 is 'Egyptian cat'
ESPRESSO = 967


@pytest.fixture(autouse=True)
def _two_threads():
    """The build machines are shared: keep torch to 2 threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite_backbones() -> dict[str, Backbone]:
    return {name: build_backbone(name) for name in LITE_CHANNELS}


def _as_batch(rgb, size: int) -> torch.Tensor:
    return preprocess([rgb], size)


def test_config_validates_backbones_from_the_registry():
    """Every registered backbone is a valid setting, and an unknown one is refused with the names."""
    from redi.core.config import from_dict
    from redi.core.errors import ConfigError

    for name in backbone_names():
        assert from_dict({"profile": "tiny", "model": {"backbone": name}}).model.backbone == name
    with pytest.raises(ConfigError, match="model.backbone must be one of .*efficientnet_lite2"):
        from_dict({"profile": "tiny", "model": {"backbone": "resnet18"}})


@pytest.mark.parametrize("name", ["efficientnet_lite2", "efficientnet_lite0"])
def test_classifier_has_real_imagenet_weights(name):
    """Random or wrongly mapped weights would not put a cat on the cat and espresso on the coffee."""
    model = build_classifier(name)
    batch = torch.cat([_as_batch(skdata.chelsea(), 224), _as_batch(skdata.coffee(), 224)])
    with torch.no_grad():
        top1 = model(batch).argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES, f"chelsea classified as {top1[0]}"
    assert top1[1] == ESPRESSO, f"coffee classified as {top1[1]}"


@pytest.mark.parametrize("name", list(LITE_CHANNELS))
@pytest.mark.parametrize("size", [(128, 128), (256, 256), (192, 256)])
def test_lite_feature_shapes(lite_backbones, name, size):
    backbone = lite_backbones[name]
    h, w = size
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, h, w))
    assert isinstance(out, BackboneOutput)
    assert backbone.channels == LITE_CHANNELS[name]
    assert backbone.strides == (4, 8, 16)
    assert len(out.features) == 3
    for feat, channels, stride in zip(out.features, backbone.channels, backbone.strides):
        assert tuple(feat.shape) == (2, channels, h // stride, w // stride)
    assert backbone.embedding_dim == sum(LITE_CHANNELS[name])
    assert tuple(out.embedding.shape) == (2, backbone.embedding_dim)
    assert out.embedding.dtype == torch.float32


def test_embedding_is_pooled_features_and_features_method_agrees(lite_backbones):
    backbone = lite_backbones["efficientnet_lite0"]
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out = backbone(x)
        feats = backbone.features(x)
    expected = torch.cat([f.mean(dim=(2, 3)) for f in out.features], dim=1)
    torch.testing.assert_close(out.embedding, expected)
    for a, b in zip(feats, out.features):
        torch.testing.assert_close(a, b)
    # Different images give different embeddings (the features depend on the input).
    assert not torch.allclose(out.embedding[0], out.embedding[1])


def test_normalisation_is_inside(lite_backbones):
    """A [0, 1] image must be mapped to [-1, 1] by the backbone: compare with the raw body."""
    backbone = lite_backbones["efficientnet_lite0"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        inside = backbone.features(x)[2]
        manual = backbone.body((x - 0.5) / 0.5)[2]
        unnormalised = backbone.body(x)[2]
    torch.testing.assert_close(inside, manual)
    assert not torch.allclose(inside, unnormalised, atol=1e-3)


def test_frozen_and_stays_in_eval(lite_backbones):
    backbone = lite_backbones["efficientnet_lite0"]
    assert all(not p.requires_grad for p in backbone.parameters())
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    parent = torch.nn.Sequential(backbone)
    parent.train()
    backbone.train(True)
    assert not backbone.training
    assert not any(m.training for m in backbone.modules())
    backbone(torch.rand(2, 3, 64, 64) * 3.0)  # would move BN statistics in train mode
    torch.testing.assert_close(bn.running_mean, stats)


def test_gradient_reaches_the_input(lite_backbones):
    """Frozen weights must still let the loss reach the recovered image."""
    backbone = lite_backbones["efficientnet_lite0"]
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    backbone(x).features[2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_channels_last_and_bf16_autocast(lite_backbones):
    backbone = lite_backbones["efficientnet_lite2"]
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        reference = backbone(x)
        backbone.to(memory_format=torch.channels_last)
        try:
            cl = backbone(x.contiguous(memory_format=torch.channels_last))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = backbone(x)
        finally:
            backbone.to(memory_format=torch.contiguous_format)
    for a, b in zip(cl.features, reference.features):
        torch.testing.assert_close(a.contiguous(), b, atol=1e-4, rtol=1e-4)
    assert amp.features[0].dtype == torch.bfloat16
    assert amp.embedding.dtype == torch.float32
    for a, b in zip(amp.features, reference.features):
        cosine = F.cosine_similarity(a.float().flatten(1), b.flatten(1), dim=1)
        assert (cosine > 0.98).all(), cosine


def test_bad_input_raises_input_error(lite_backbones):
    backbone = lite_backbones["efficientnet_lite0"]
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(1, 1, 64, 64))
    with pytest.raises(InputError):
        backbone(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_name_raises_clear_error():
    """The error names the setting and lists every registered backbone."""
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet9000' \(setting model.backbone\); choose one of "
                                          r"\['efficientnet_lite0', 'efficientnet_lite2', 'wide_resnet50_2'\]"):
        build_backbone("resnet9000")
    with pytest.raises(ConfigError, match="EfficientNet-Lite backbone.*'wide_resnet50_2'"):
        build_classifier("wide_resnet50_2")


def test_in_order_mapping_rejects_mismatch():
    good = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    target = {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2), "x.num_batches_tracked": torch.tensor(0)}
    assert list(map_state_dict_in_order(good, target, "src")) == ["x.weight", "x.bias"]
    with pytest.raises(WeightsError, match=r"tensor 1 'a.bias' \(3,\)"):
        map_state_dict_in_order({"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(3)}, target, "src")
    with pytest.raises(WeightsError, match="1 tensors but the model expects 2"):
        map_state_dict_in_order({"a.weight": torch.zeros(2, 3)}, target, "src")


def test_lite_weights_file_of_wrong_model_is_rejected(tmp_path):
    wrong = tmp_path / "not_lite.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), wrong)
    with pytest.raises(WeightsError, match="not_lite.pth"):
        build_backbone("efficientnet_lite0", weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="(?s)weights file .*garbage.pth cannot be read.*state dict"):
        build_backbone("efficientnet_lite0", weights=garbage)


# ---------------------------------------------------------------------------- wide_resnet50_2

@pytest.fixture()
def empty_hub(tmp_path, monkeypatch) -> Path:
    """Point torch hub at an empty folder so that no cached download is found."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


@pytest.fixture(scope="module")
def random_wrn_file(tmp_path_factory) -> Path:
    """A torchvision wide_resnet50_2 state dict with RANDOM weights: it tests the loading path
    only (no ImageNet weights can be installed on the build machines)."""
    from torchvision.models import wide_resnet50_2

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wrn") / "wide_resnet50_2-random.pth"
    torch.save(wide_resnet50_2(weights=None).state_dict(), path)
    return path


def test_wrn_without_weights_says_where_to_put_them(empty_hub):
    with pytest.raises(WeightsError) as info:
        build_backbone("wide_resnet50_2")
    message = str(info.value)
    assert str(empty_hub / "checkpoints") in message
    assert "Wide_ResNet50_2_Weights.IMAGENET1K_V1" in message
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert "backbone_weights" in message


def test_wrn_missing_weights_file_is_named(empty_hub, tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        build_backbone("wide_resnet50_2", weights=tmp_path / "nope.pth")


def test_wrn_loads_a_weights_file(empty_hub, random_wrn_file):
    backbone = build_backbone("wide_resnet50_2", weights=random_wrn_file)
    saved = torch.load(random_wrn_file, weights_only=True)
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    assert backbone.channels == (256, 512, 1024)
    assert backbone.embedding_dim == 1792
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not any(t.is_meta for t in backbone.state_dict().values())
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in out.features] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6)]
    assert torch.isfinite(out.embedding).all()


def test_wrn_found_in_hub_cache(empty_hub, random_wrn_file):
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / random_wrn_file.name).symlink_to(random_wrn_file)
    backbone = build_backbone("wide_resnet50_2")
    assert backbone.channels == (256, 512, 1024)


def test_wrn_rejects_another_models_file(empty_hub, tmp_path):
    from torchvision.models import resnet18

    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"resnet18.pth.*this file is not for this model"):
        build_backbone("wide_resnet50_2", weights=wrong)
