"""The torch modules: shapes for several backbones and sizes, losses, prompts, artifact round trip."""

from pathlib import Path

import pytest
import torch

from redi.core.config import profile_config
from redi.core.errors import InputError, WeightsError
from redi.methods.redi.losses import msgms_loss, recover_loss, self_correlation_distance
from redi.methods.base import load_detector, save_detector
from redi.methods.redi.detector import Detector
from redi.methods.redi.discriminate import DiscriminateHead
from redi.methods.redi.recover import RecoverNet
from redi.methods.redi.prompt import PromptBank, nearest_prompt
from redi.core.utils import load_torch_file


@pytest.mark.parametrize("channels, size", [((24, 48, 120), 128), ((24, 40, 112), 256), ((256, 512, 1024), 64)])
def test_discriminate_head_restores_reference_shapes(channels, size):
    features = [torch.randn(2, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16))]
    out = DiscriminateHead(channels, bottleneck_channels=min(channels[-1], 128))(features)
    assert [tuple(f.shape) for f in out] == [tuple(f.shape) for f in features]


@pytest.mark.parametrize("size, depth, work", [(128, 3, 0), (256, 4, 128), (96, 3, 0)])
def test_recover_net_outputs_image_at_input_size(size, depth, work):
    net = RecoverNet(1, base_width=4, depth=depth, work_size=work)
    y = net(torch.rand(2, 1, size, size), torch.rand(2, 3, size, size))
    assert y.shape == (2, 3, size, size) and 0 <= float(y.detach().min()) and float(y.detach().max()) <= 1


def test_recover_net_rejects_sizes_it_cannot_pool():
    with pytest.raises(ValueError, match="multiple of"):
        RecoverNet(1, base_width=4, depth=4)(torch.rand(1, 1, 36, 36), torch.rand(1, 3, 36, 36))


def test_self_correlation_equals_brute_force():
    torch.manual_seed(0)
    fx, fy = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    fast = self_correlation_distance(fx, fy)
    for b in range(2):
        a = torch.softmax(fx[b], dim=0).reshape(5, -1).double()
        c = torch.softmax(fy[b], dim=0).reshape(5, -1).double()
        g_x = torch.zeros(12, 12, dtype=torch.float64)
        g_y = torch.zeros(12, 12, dtype=torch.float64)
        for i in range(12):
            for j in range(12):
                g_x[i, j] = sum(a[k, i] * a[k, j] for k in range(5))
                g_y[i, j] = sum(c[k, i] * c[k, j] for k in range(5))
        brute = torch.sqrt(((g_x - g_y) ** 2).sum()) / 12
        assert abs(float(fast[b]) - float(brute)) < 1e-6


def test_self_correlation_is_zero_for_equal_features_and_differentiable():
    fx = torch.randn(1, 8, 4, 4, requires_grad=True)
    assert float(self_correlation_distance(fx, fx.detach().clone())) < 1e-6
    self_correlation_distance(fx, torch.randn(1, 8, 4, 4)).sum().backward()
    assert torch.isfinite(fx.grad).all()


def test_recover_loss_is_zero_only_for_identical_images():
    x = torch.rand(2, 3, 32, 32)
    assert float(recover_loss(x, x)) < 1e-6
    assert float(msgms_loss(x, torch.rand(2, 3, 32, 32))) > 0.1


def test_prompt_retrieval_never_returns_the_query_itself():
    torch.manual_seed(1)
    embeddings = torch.randn(10, 16)
    bank = PromptBank(embeddings, [f"id{i}" for i in range(10)], "efficientnet_lite0")
    own = torch.arange(10)
    index, _ = bank.nearest(bank.embeddings, exclude=own)
    assert (index != own).all()
    # without exclusion the query finds itself: the exclusion is what prevents it
    assert (bank.nearest(bank.embeddings)[0] == own).all()
    duplicates = torch.cat([embeddings[:1]] * 3)  # equal embeddings: still never itself
    index, _ = nearest_prompt(duplicates, torch.nn.functional.normalize(duplicates), torch.arange(3))
    assert (index != torch.arange(3)).all()


def test_prompt_bank_round_trip_and_backbone_check(tmp_path: Path):
    bank = PromptBank(torch.randn(3, 4), ["a", "b", "c"], "efficientnet_lite0")
    path = bank.save(tmp_path / "bank.pt")
    assert PromptBank.load(path).image_ids == ["a", "b", "c"]
    with pytest.raises(WeightsError, match="rebuild the bank"):
        PromptBank.load(path, backbone="efficientnet_lite2")
    with pytest.raises(WeightsError, match="build it first"):
        PromptBank.load(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def tiny_detector():
    cfg = profile_config("tiny")
    detector = Detector(cfg, num_prompts=4)
    size = cfg.data.image_size
    detector.set_prompts(torch.randn(4, detector.backbone.embedding_dim), torch.rand(4, 3, size, size),
                         ["p0", "p1", "p2", "p3"])
    detector.threshold.fill_(0.5)
    return detector.eval()


def test_detector_outputs_and_determinism(tiny_detector):
    size = tiny_detector.image_size
    x = torch.rand(2, 3, size, size)
    first, second = tiny_detector.predict(x), tiny_detector.predict(x)
    assert first.score.shape == (2,) and first.anomaly_map.shape == (2, size, size)
    assert first.recovered.shape == (2, 3, size, size) and first.prompt_index.shape == (2,)
    assert torch.equal(first.score, second.score) and torch.equal(first.anomaly_map, second.anomaly_map)
    # the image score is the mean of the map's top 1 % of pixels (model.image_score's default, top_mean)
    assert tiny_detector.cfg.model.image_score == "top_mean"
    flat = first.anomaly_map.flatten(1)
    top = max(1, int(tiny_detector.cfg.model.image_score_share * flat.shape[1]))
    assert torch.allclose(first.score, flat.sort(dim=1, descending=True).values[:, :top].mean(1))
    assert (first.score < flat.amax(1)).all()  # not the maximum: one hot pixel no longer decides alone


def test_detector_rejects_wrong_channels_and_size(tiny_detector):
    size = tiny_detector.image_size
    with pytest.raises(InputError, match="preprocess"):
        tiny_detector.predict(torch.rand(1, 1, size, size))
    with pytest.raises(InputError, match="preprocess"):
        tiny_detector.predict(torch.rand(1, 3, size + 32, size))
    with pytest.raises(InputError, match="float"):
        tiny_detector.predict(torch.zeros(1, 3, size, size, dtype=torch.uint8))


def test_detector_artifact_round_trip(tiny_detector, tmp_path: Path):
    path = save_detector(tiny_detector, tmp_path / "detector.pt", {"line": "caps"})
    loaded = load_detector(path)
    x = torch.rand(1, 3, loaded.image_size, loaded.image_size)
    assert torch.equal(loaded.predict(x).score, tiny_detector.predict(x).score)
    assert loaded.metadata["line"] == "caps" and loaded.prompt_ids == ["p0", "p1", "p2", "p3"]
    assert float(loaded.threshold) == 0.5


def test_checkpoint_from_another_backbone_is_refused(tiny_detector, tmp_path: Path):
    path = save_detector(tiny_detector, tmp_path / "detector.pt")
    payload = load_torch_file(path, "detector", "")
    payload["config"]["model"]["backbone"] = "efficientnet_lite2"  # weights were made for lite0
    torch.save(payload, path)
    with pytest.raises(WeightsError, match="backbone channels"):
        load_detector(path)


def test_missing_or_corrupt_artifact(tmp_path: Path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_detector(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="corrupt"):
        load_detector(tmp_path / "bad.pt")


def test_dataset_path_and_detector_preprocess_give_identical_tensors(tiny_detector, tmp_path: Path):
    """Training, calibration and evaluation (dataset path) see exactly what predict, serving and
    the drift reference (Detector.preprocess) see, for a file whose size differs from the model's."""
    import numpy as np
    from PIL import Image

    from redi.data.dataset import ImageDataset, load_images, load_sample
    from redi.data.mvtec import Sample
    from redi.core.images import load_rgb

    size = tiny_detector.image_size
    rng = np.random.default_rng(0)
    path = tmp_path / "part.png"
    Image.fromarray(rng.integers(0, 256, (size + 37, 2 * size - 5, 3), dtype=np.uint8)).save(path)
    sample = Sample(path=path, label=0, defect_type="good", mask_path=None, image_id="test/good/part")

    served = tiny_detector.preprocess([load_rgb(path)])[0]
    assert served.shape == (3, size, size)
    assert torch.equal(load_sample(sample, size)[0], served)
    assert torch.equal(load_images([sample], size)[0], served)
    assert torch.equal(ImageDataset([sample], size)[0]["image"], served)


def test_recover_training_prompts_equal_the_served_prompts(tiny_detector):
    """as_served_prompts (what a recover net trains on) equals what the detector serves for the
    same images; lossy WebP stays close to the uint8 images, PNG is exact."""
    import copy

    from redi.methods.redi.detector import as_served_prompts
    from redi.methods.redi.prompt import PromptImages

    detector = copy.deepcopy(tiny_detector)  # the fixture is shared: leave its bank alone
    size = detector.image_size
    images = _smooth_images(4, size)
    detector.set_prompts(torch.randn(4, detector.backbone.embedding_dim), images, ["a", "b", "c", "d"])
    served = detector.prompt_batch(torch.arange(4), images)
    assert torch.equal(as_served_prompts(images), served)
    assert (served - images).abs().mean() < 3 / 255
    lossless = PromptImages.encode(images, codec="png").decode_float()
    assert torch.equal(lossless, (images * 255).round() / 255)


def test_prompt_codec_comes_from_the_config(tiny_detector):
    """model.prompt_codec=png stores the bank losslessly: the served prompts are the uint8 images."""
    import copy

    detector = copy.deepcopy(tiny_detector)
    detector.cfg.model.prompt_codec = "png"
    images = _smooth_images(3, detector.image_size)
    detector.set_prompts(torch.randn(3, detector.backbone.embedding_dim), images, ["a", "b", "c"])
    assert detector.prompts.codec == "png"
    assert torch.equal(detector.prompt_batch(torch.arange(3), images), (images * 255).round() / 255)


def _smooth_images(n: int, size: int) -> torch.Tensor:
    """Images with structure (not white noise, which no image codec is made for)."""
    generator = torch.Generator().manual_seed(n)
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _bank_detector(overrides: dict[str, object], n: int = 6):
    cfg = profile_config("tiny")
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        target = getattr(cfg, section)
        *parents, leaf = name.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    detector = Detector(cfg, num_prompts=n)
    size = cfg.data.image_size
    detector.set_prompts(torch.randn(n, detector.backbone.embedding_dim, generator=torch.Generator().manual_seed(1)),
                         _smooth_images(n, size), [f"p{i}" for i in range(n)])
    detector.threshold.fill_(0.5)
    return detector.eval()


@pytest.mark.parametrize("overrides", [{"model.recover.enabled": False}, {"model.prompt": "none"}])
def test_artifact_without_prompt_use_has_no_prompt_images(overrides, tmp_path: Path):
    detector = _bank_detector(overrides)
    assert len(detector.prompts) == 0 and detector.prompts.nbytes <= 8
    path = save_detector(detector, tmp_path / "detector.pt")
    payload = load_torch_file(path, "detector", "")
    assert payload["prompts"]["data"].numel() == 0
    assert not any("prompt_images" in key for key in payload["state"])
    loaded = load_detector(path)
    x = _smooth_images(3, loaded.image_size)
    before, after = detector.predict(x), loaded.predict(x)
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)


def test_saved_then_loaded_detector_scores_equal(tmp_path: Path):
    detector = _bank_detector({})
    path = save_detector(detector, tmp_path / "detector.pt")
    loaded = load_detector(path)
    x = _smooth_images(3, loaded.image_size)
    before, after = detector.predict(x), loaded.predict(x)
    assert (before.prompt_index >= 0).all()
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)
    assert loaded.prompts.data.numel() == detector.prompts.data.numel() > 0
    assert torch.equal(loaded.prompts.decode(), detector.prompts.decode())


def test_version_1_artifact_with_raw_prompts_still_loads_with_equal_scores(tmp_path: Path):
    """A format-1 file kept every prompt as raw uint8 pixels in its state dict; it loads, its
    prompts are re-encoded losslessly, so it serves the very pixels (and scores) it did."""
    from redi.methods.base import ARTIFACT_VERSION
    from redi.methods.redi.prompt import PromptImages

    detector = _bank_detector({})
    raw = detector.prompts.decode()  # the uint8 pixels a version-1 file would have held
    detector.prompts = PromptImages.encode_uint8(raw, codec="png")
    path = save_detector(detector, tmp_path / "detector.pt")
    payload = load_torch_file(path, "detector", "")
    assert payload["format_version"] == ARTIFACT_VERSION == 2
    payload["format_version"] = 1
    del payload["prompts"]
    payload["state"]["prompt_images"] = raw
    torch.save(payload, path)
    loaded = load_detector(path)
    assert loaded.prompts.codec == "png" and torch.equal(loaded.prompts.decode(), raw)
    x = _smooth_images(2, loaded.image_size)
    assert torch.equal(loaded.predict(x).score, detector.predict(x).score)


def test_artifact_of_unknown_version_is_refused_with_the_fix(tiny_detector, tmp_path: Path):
    path = save_detector(tiny_detector, tmp_path / "detector.pt")
    payload = load_torch_file(path, "detector", "")
    for version, message in ((99, "upgrade redi"), (0, "retrain")):
        payload["format_version"] = version
        torch.save(payload, path)
        with pytest.raises(WeightsError, match=message):
            load_detector(path)


def test_trained_detector_serves_the_prompt_bytes_its_recover_net_trained_on(trained_line):
    """train_recover encodes the bank once, trains on the decoded prompts and stores the bytes in
    recover.pt; the detector artifact carries those same bytes."""
    from redi.methods.redi.prompt import PROMPT_CODEC, PromptImages

    recover = load_torch_file(trained_line["recover"], "recover", "")
    detector = load_detector(trained_line["detector"])
    trained_on = PromptImages.from_payload(recover["prompts"])
    assert detector.prompts.codec == trained_on.codec == PROMPT_CODEC
    assert torch.equal(detector.prompts.data, trained_on.data)
    assert torch.equal(detector.prompts.offsets, trained_on.offsets)
    assert recover["prompt_ids"] == detector.prompt_ids


def test_auto_precision_is_measured_and_frozen_into_the_detector(trained_line):
    """precision=auto is decided by timing bf16 against fp32 here, and the detector keeps the
    decision, so its scores are made wherever it runs as its threshold was calibrated."""
    from redi.methods.base import load_detector
    from redi.core.utils import BF16_MIN_SPEEDUP, bf16_speedup, use_bf16

    speedup = bf16_speedup("cpu")
    assert speedup > 0 and bf16_speedup("cpu") == speedup  # measured once per process
    assert use_bf16("auto", torch.device("cpu")) == (speedup >= BF16_MIN_SPEEDUP)
    assert use_bf16("fp32", torch.device("cpu")) is False and use_bf16("bf16", torch.device("cpu")) is True
    detector = load_detector(trained_line["detector"])
    assert detector.cfg.model.recover.precision == ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")


def test_bottleneck_dropout_acts_while_training_only():
    channels = (16, 24, 40)
    features = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    torch.manual_seed(0)
    head = DiscriminateHead(channels, 32, dropout=0.5)
    head.eval()
    assert all(torch.equal(a, b) for a, b in zip(head(features), head(features)))  # eval: no dropout
    head.train()
    first, second = head(features), head(features)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # training: features dropped at random
    plain = DiscriminateHead(channels, 32)
    assert isinstance(plain.dropout, torch.nn.Identity) and set(head.state_dict()) == set(plain.state_dict())


def test_feature_noise_lands_in_one_box_per_image_only():
    from redi.methods.redi.fit import noisy_box

    torch.manual_seed(1)
    features = torch.randn(4, 8, 20, 50)
    assert noisy_box(features, 0.0) is features
    noisy = noisy_box(features, 1.0)
    for changed in (noisy != features).any(dim=1):  # (20, 50) per image
        rows, cols = torch.nonzero(changed, as_tuple=True)
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and changed.sum() == box.numel()  # one filled rectangle
        assert 2 <= box.shape[0] <= 10 and 5 <= box.shape[1] <= 25  # 10-50 % of each side
