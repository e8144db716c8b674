"""The method's options of issue 9: the paper profile's backbone, out-of-fold recovery, k nearest
prompts and the augmented prompt bank, on a small demo line trained for seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redi.cli.main import main as redi_main
from redi.core.config import load_config, profile_config
from redi.methods.base import load_detector
from redi.methods.redi.prompt import PromptBank, prompt_pixels, top_prompts, transform_images
from redi.methods.redi.fit import (build_prompt_bank, leave_one_out_prompts, precompute_selfmaps, recover_folds,
                                   train_discriminate, train_recover)
from redi.core.utils import load_torch_file
from tiny_line import make_line


def _cfg(data: Path, *overrides: str):
    """The ``tiny`` profile cut to a handful of steps, on the CPU."""
    return load_config(profile="tiny", overrides=[f"data.root={data}", "train.device=cpu", "train.recover.epochs=1",
                                                   "train.discriminate.epochs=1", *overrides])


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    return make_line(tmp_path_factory.mktemp("options"), "bottle_caps")


def test_paper_profile_is_the_papers_backbone_and_fails_clearly_without_its_weights(line, tmp_path, monkeypatch,
                                                                                    capsys):
    assert profile_config("paper").model.backbone == "wide_resnet50_2"
    assert profile_config("paper_lite").model.backbone == "efficientnet_lite2"
    assert profile_config("paper_lite").train.recover.epochs == profile_config("paper").train.recover.epochs
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    code = redi_main(["train", str(line), "--out", str(tmp_path / "run"), "--profile", "paper"])
    err = capsys.readouterr().err
    assert code != 0
    assert "wide_resnet50_2" in err and "backbone_weights" in err and "Traceback" not in err


def test_out_of_fold_recovery_never_uses_a_net_that_trained_on_the_image(line, tmp_path, monkeypatch):
    import redi.methods.redi.fit as stages

    trained_on: dict[str, list[int]] = {}
    real = stages._train_one_recover_net

    def recording(name, cfg, data, subset, *args, **kwargs):
        trained_on[name] = subset.tolist()
        return real(name, cfg, data, subset, *args, **kwargs)

    monkeypatch.setattr(stages, "_train_one_recover_net", recording)
    cfg = _cfg(line, "train.recover_folds=3")
    bank = build_prompt_bank(line, tmp_path / "bank.pt", cfg)
    maps = precompute_selfmaps(line, tmp_path, cfg)
    recover = load_torch_file(train_recover(line, bank, tmp_path, cfg, maps), "recover", "")
    folds, states = recover["folds"], recover["fold_states"]
    n = len(PromptBank.load(bank))
    assert len(folds) == len(states) == 3
    assert sorted(i for fold in folds for i in fold) == list(range(n))  # every image in exactly one fold
    for number, fold in enumerate(folds):
        seen = trained_on[f"recover fold {number + 1}/3"]
        assert not set(seen) & set(fold) and sorted(seen + fold) == list(range(n))
    assert trained_on["recover"] == list(range(n))  # the served net sees every bank image
    assert recover_folds(n, 3, 0) == folds and recover_folds(n, 3, 1) != folds
    assert load_detector(train_discriminate(line, bank, tmp_path / "recover.pt", tmp_path, cfg)).use_recover


def test_out_of_fold_features_come_from_the_fold_nets(line, tmp_path):
    """Y of an image in fold f equals what fold f's net recovers, and differs from the served net's."""
    from redi.methods.redi.detector import Detector
    from redi.methods.common import open_line
    from redi.methods.redi.fit import _bank_images, _out_of_fold_features, load_bank

    cfg = _cfg(line, "train.recover_folds=2")
    bank_path = build_prompt_bank(line, tmp_path / "bank.pt", cfg)
    recover_path = train_recover(line, bank_path, tmp_path, cfg, precompute_selfmaps(line, tmp_path, cfg))
    payload = load_torch_file(recover_path, "recover", "")
    bank = load_bank(bank_path, cfg)
    _, images = _bank_images(bank, open_line(line, cfg), cfg)
    detector = Detector(cfg, num_prompts=bank.embeddings.shape[0])
    detector.set_prompts(bank.embeddings, images, bank.image_ids)
    detector.recover.load_state_dict(payload["state"])
    detector.selfmap.set_scale(payload["selfmap_scale"])
    detector.eval()
    index = leave_one_out_prompts(bank)
    _, oof = _out_of_fold_features(detector, recover_path, images, index, torch.device("cpu"), 4)
    served_y = detector.recover_image(images, index)
    served = detector.backbone(served_y).features
    for fold, state in zip(payload["folds"], payload["fold_states"]):
        detector.recover.load_state_dict(state)
        rows = torch.tensor(fold)
        with torch.no_grad():
            own = detector.backbone(detector.recover_image(images[rows], index[rows])).features
        torch.testing.assert_close(oof[0][rows], own[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(oof[0][rows], served[0][rows], atol=1e-4)


def test_augmented_bank_never_gives_an_image_itself_under_any_transform(line, tmp_path):
    cfg = _cfg(line, "model.prompt_transforms=[hflip,rot180]")
    bank = PromptBank.load(build_prompt_bank(line, tmp_path / "bank.pt", cfg))
    n = len(bank)
    assert bank.transforms == ["hflip", "rot180"] and bank.embeddings.shape[0] == 3 * n
    prompts = leave_one_out_prompts(bank)
    assert ((prompts % n) != torch.arange(n)).all()
    # a query that is a bank image's mirror finds that image's mirrored entry first
    query = bank.embeddings[n + 2:n + 3]  # image 2 under hflip
    assert int(bank.nearest(query)[0]) == n + 2
    # the pixels of an augmented index are the transformed image
    decoded = torch.rand(n, 3, 8, 8)
    pixels = prompt_pixels(lambda base: decoded[base], torch.tensor([2, n + 2, 2 * n + 2]), n,
                           ["identity", "hflip", "rot180"])
    assert torch.equal(pixels[0], decoded[2]) and torch.equal(pixels[1], transform_images(decoded[2], "hflip"))
    assert torch.equal(pixels[2], transform_images(decoded[2], "rot180"))


def test_k_nearest_prompts_give_a_pointwise_minimum_map(line, tmp_path):
    cfg = _cfg(line)
    bank = build_prompt_bank(line, tmp_path / "bank.pt", cfg)
    recover = train_recover(line, bank, tmp_path, cfg, precompute_selfmaps(line, tmp_path, cfg))
    one = load_detector(train_discriminate(line, bank, recover, tmp_path / "k1", cfg))
    images = one.preprocess([__import__("numpy").zeros((128, 128, 3), "uint8") + 120,
                             __import__("numpy").full((128, 128, 3), 60, "uint8")])
    three = load_detector(tmp_path / "k1" / "detector.pt")
    three.prompt_k = 3
    out1, out3 = one.predict(images), three.predict(images)
    assert (out3.anomaly_map <= out1.anomaly_map + 1e-5).all()  # the top-1 map is one of the three
    candidates = top_prompts(one.backbone(images).embedding, one.prompt_embeddings, 3)[0]
    maps = []
    for rank in range(3):
        y = one.recover_image(images, candidates[:, rank])
        maps.append(one.anomaly_maps(one.backbone(images).features, one.head(one.backbone(y).features)))
    torch.testing.assert_close(out3.anomaly_map, torch.stack(maps).amin(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(out3.prompt_index, out1.prompt_index)


def test_an_artifact_from_before_the_new_settings_loads_as_it_was_trained(trained_line, tmp_path):
    """Settings an older redi did not write take the behaviour that redi had, not the profile's
    current defaults (the cpu profile's 2x bottleneck would not fit the saved head)."""
    payload = load_torch_file(trained_line["detector"], "detector", "")
    config = payload["config"]
    config["profile"] = "cpu"
    del config["model"]["bottleneck_ratio"], config["model"]["selfmap"]["scale"], config["train"]["recover"]["steps"]
    del payload["state"]["selfmap.scale"]  # older artifacts had no fitted self-map scale
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    detector = load_detector(old)
    assert detector.cfg.model.bottleneck_ratio == 1.0 and detector.cfg.model.selfmap.scale == "image"
    assert detector.cfg.train.recover.steps == 0 and profile_config("cpu").model.bottleneck_ratio == 2.0
    x = torch.rand(1, 3, detector.image_size, detector.image_size)
    assert torch.isfinite(detector.predict(x).score).all()
