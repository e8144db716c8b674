"""The torch modules: shapes for several backbones and sizes, losses, prompts, artifact round trip."""

from pathlib import Path

import pytest
import torch

from redi.config import profile_config
from redi.errors import InputError, WeightsError
from redi.losses import msgms_loss, recover_loss, self_correlation_distance
from redi.models.detector import Detector, load_detector, save_detector
from redi.models.discriminate import DiscriminateHead
from redi.models.recover import RecoverNet
from redi.prompt import PromptBank, nearest_prompt
from redi.utils import load_torch_file


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
    assert torch.allclose(first.score, first.anomaly_map.flatten(1).amax(1))


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
    from redi.images import load_rgb

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
    """train_recover feeds as_served_prompts(images); the detector serves its uint8 copy: equal."""
    import copy

    from redi.models.detector import as_served_prompts

    detector = copy.deepcopy(tiny_detector)  # the fixture is shared: leave its bank alone
    size = detector.image_size
    images = torch.rand(4, 3, size, size)
    detector.set_prompts(torch.randn(4, detector.backbone.embedding_dim), images, ["a", "b", "c", "d"])
    served = detector.prompt_batch(torch.arange(4), images)
    assert torch.equal(as_served_prompts(images), served)
    assert (served - images).abs().max() <= 0.5 / 255 + 1e-7
