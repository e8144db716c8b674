"""run_training: step and epoch budgets, the LR schedule, resume, the estimate line, best-val selection."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from redi.core.config import StageTrainConfig
from redi.core.errors import ConfigError
from redi.methods.training import budget_passes, run_training, steps_per_pass

CPU = torch.device("cpu")


class Line:
    """A tiny regression problem: a Linear model, fixed random tensors, a step function that counts calls.

    ``kill_at`` makes the n-th call raise, as a killed process would stop mid-pass.
    """

    def __init__(self, num_samples: int, kill_at: int = 0) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(num_samples, 4, generator=generator)
        self.y = torch.randn(num_samples, 1, generator=generator)
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.kill_at = kill_at

    def step(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("killed")
        assert self.model.training, "validate must leave the model in train mode"
        self.batch_sizes.append(len(indices))
        noise = torch.randn(len(indices), 1) * 0.01  # uses the global RNG: resume must restore it
        error = self.model(self.x[indices]) - self.y[indices] + noise
        loss = error.pow(2).mean()
        return loss, {"part": float(loss.detach()) / 2}

    def train(self, stage: StageTrainConfig, checkpoint: Path, run_id: str = "run", **kwargs):
        stream = io.StringIO()
        result = run_training("test", self.model, stage, len(self.x), self.step, checkpoint, run_id, seed=3,
                              device=CPU, amp=False, stream=stream, **kwargs)
        return result, stream.getvalue()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("num_samples, batch_size, steps, per_pass, passes, pass_steps", [
    (5, 2, 7, 2, 4, [2, 4, 6, 7]),  # 2 pairs per pass, the lone fifth image sits out
    (50, 4, 30, 13, 3, [13, 26, 30]),  # 12 batches of 4 and one of 2 per pass; the last pass stops early
])
def test_step_budget_does_exactly_that_many_optimizer_steps(tmp_path, num_samples, batch_size, steps, per_pass,
                                                            passes, pass_steps):
    line = Line(num_samples)
    stage = StageTrainConfig(epochs=999, steps=steps, batch_size=batch_size, lr=1e-2)
    assert steps_per_pass(batch_size, num_samples) == per_pass
    assert budget_passes(stage, num_samples) == passes
    result, _ = line.train(stage, tmp_path / "ckpt.pt")
    assert line.calls == steps and result.steps == steps and result.epochs == passes
    assert [h["step"] for h in result.history] == pass_steps
    assert [h["epoch"] for h in result.history] == list(range(1, passes + 1))
    assert min(line.batch_sizes) >= 2  # BatchNorm's rule: never a batch of one


def test_epoch_budget_is_unchanged_and_its_milestones_count_epochs(tmp_path):
    line = Line(50)
    stage = StageTrainConfig(epochs=3, steps=0, batch_size=4, lr=1e-2, milestones=[1, 2])
    result, _ = line.train(stage, tmp_path / "ckpt.pt")
    assert line.calls == 3 * 13 and result.epochs == 3 and result.steps == 39
    assert [h["lr"] for h in result.history] == pytest.approx([5e-3, 2.5e-3, 2.5e-3])
    assert budget_passes(stage, 50) == 3


def test_lr_halves_at_the_step_milestones(tmp_path):
    line = Line(50)
    lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        line.train(StageTrainConfig(steps=10, batch_size=4, lr=0.4, milestones=[4, 8]), tmp_path / "ckpt.pt")
    finally:
        hook.remove()
    assert lrs == pytest.approx([0.4] * 4 + [0.2] * 4 + [0.1] * 2)


def test_a_finished_run_returns_without_training(tmp_path):
    stage = StageTrainConfig(steps=20, batch_size=4, lr=1e-2)
    first, _ = Line(50).train(stage, tmp_path / "ckpt.pt")
    again = Line(50)
    result, log = again.train(stage, tmp_path / "ckpt.pt")
    assert again.calls == 0 and result.steps == 20 and result.epochs == first.epochs == 2
    assert [h["step"] for h in result.history] == [13, 20]
    assert "resuming from checkpoint" in log and "budget" not in log


@pytest.mark.parametrize("stage", [
    StageTrainConfig(steps=40, batch_size=4, lr=5e-2, milestones=[15, 30]),
    StageTrainConfig(epochs=4, batch_size=4, lr=5e-2, milestones=[1, 3]),
], ids=["steps", "epochs"])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, stage):
    whole = Line(50)
    whole.train(stage, tmp_path / "whole.pt")
    killed = Line(50, kill_at=31)  # during the third pass: the checkpoint holds pass 2 (26 steps)
    with pytest.raises(KeyboardInterrupt):
        killed.train(stage, tmp_path / "killed.pt")
    assert torch.load(tmp_path / "killed.pt", weights_only=False)["step"] == 26
    resumed = Line(50)
    with torch.no_grad():  # another start: the checkpoint, not the init, must decide the weights
        resumed.model.weight.fill_(7.0)
    result, log = resumed.train(stage, tmp_path / "killed.pt")
    assert resumed.calls == (40 if stage.steps else 52) - 26 and result.resumed_from == 2
    for key, value in _weights(whole.model).items():
        assert torch.allclose(resumed.model.state_dict()[key], value, atol=1e-6), key
    budget = 40 if stage.steps else 52
    assert re.search(rf"budget {budget} steps \(~4 passes over 50 images\), resuming at step 26, "
                     r"estimated \d+:\d\d:\d\d", log)


def test_the_estimate_line_comes_before_the_first_pass_line(tmp_path):
    _, log = Line(50).train(StageTrainConfig(steps=30, batch_size=4, lr=1e-2), tmp_path / "ckpt.pt")
    lines = log.splitlines()
    estimate = [i for i, text in enumerate(lines)
                if re.fullmatch(r"\[test\] budget 30 steps \(~3 passes over 50 images\), estimated "
                                r"\d+:\d\d:\d\d \(.* s/step\)", text)]
    first_pass = next(i for i, text in enumerate(lines) if text.startswith("[test] pass 1/3 step 13/30 "))
    assert len(estimate) == 1 and estimate[0] < first_pass
    assert re.search(r"pass 3/3 step 30/30 loss \S+ part \S+ lr .* ETA 0:00:00", log)


def test_a_budget_shorter_than_the_timed_steps_still_prints_its_estimate(tmp_path):
    _, log = Line(5).train(StageTrainConfig(steps=1, batch_size=4, lr=1e-2), tmp_path / "ckpt.pt")
    assert "budget 1 steps (~1 passes over 5 images), estimated" in log


def test_keep_best_restores_the_state_of_the_lowest_val_loss_and_keeps_it_on_resume(tmp_path):
    line = Line(50)
    seen: list[dict[str, torch.Tensor]] = []
    scores = iter([3.0, 1.0, 2.0, 5.0])

    def validate() -> float:
        assert not line.model.training and not torch.is_grad_enabled()
        seen.append(_weights(line.model))
        return next(scores)

    stage = StageTrainConfig(steps=45, batch_size=4, lr=5e-2)
    result, log = line.train(stage, tmp_path / "ckpt.pt", validate=validate, keep_best=True)
    assert [h["val_loss"] for h in result.history] == [3.0, 1.0, 2.0, 5.0]
    assert result.best == {"epoch": 2, "step": 26, "val_loss": 1.0}
    assert "keeping the model of pass 2 (step 26)" in log
    for key, value in seen[1].items():
        assert torch.equal(line.model.state_dict()[key], value)
    assert not torch.equal(seen[1]["weight"], seen[3]["weight"])  # the last pass's weights differ
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["best"]["epoch"] == 2

    again = Line(50)  # finished run rerun: the best state comes from the checkpoint
    result, _ = again.train(stage, tmp_path / "ckpt.pt", validate=validate, keep_best=True)
    assert again.calls == 0 and result.best["epoch"] == 2
    for key, value in seen[1].items():
        assert torch.equal(again.model.state_dict()[key], value)


def test_validate_without_keep_best_only_records(tmp_path):
    line = Line(50)
    result, _ = line.train(StageTrainConfig(steps=26, batch_size=4, lr=1e-2), tmp_path / "ckpt.pt",
                           validate=lambda: 0.5)
    assert [h["val_loss"] for h in result.history] == [0.5, 0.5] and result.best is None


def test_impossible_budgets_and_settings_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="BatchNorm needs two"):
        budget_passes(StageTrainConfig(steps=5, batch_size=1), 10)
    with pytest.raises(ConfigError, match="cannot be done"):
        budget_passes(StageTrainConfig(steps=5, batch_size=4), 0)
    with pytest.raises(ValueError, match="keep_best=True needs a validate"):
        Line(5).train(StageTrainConfig(steps=2, batch_size=2), tmp_path / "ckpt.pt", keep_best=True)


def test_a_pass_floor_raises_a_step_budget_and_scales_its_milestones():
    from redi.methods.training import with_pass_floor

    stage = StageTrainConfig(steps=180, milestones=[90, 150], batch_size=8, min_passes=20)
    assert with_pass_floor(stage, 46) is stage  # 46 images: 180 steps are already 30 passes
    raised = with_pass_floor(stage, 760)  # 95 steps per pass: 180 steps would be 1.9 passes
    assert raised.steps == 20 * 95 and budget_passes(raised, 760) == 20
    assert raised.milestones == [950, 1583]


def test_the_time_cap_stops_a_stage_and_a_rerun_finishes_it(tmp_path):
    import time as _time

    model = torch.nn.Linear(2, 1)
    data = torch.randn(8, 2)

    def slow_step(indices):
        _time.sleep(0.05)
        return model(data[indices]).pow(2).mean(), {}

    stage = StageTrainConfig(steps=40, batch_size=4, max_minutes=0.3 / 60)  # 0.3 s: about 6 of 40 steps
    checkpoint = tmp_path / "last.pt"
    first = run_training("t", model, stage, 8, slow_step, checkpoint, "run", 0, torch.device("cpu"))
    assert first.stopped_early and 0 < first.steps < 40
    rest = run_training("t", model, dataclasses.replace(stage, max_minutes=0.0), 8, slow_step, checkpoint, "run", 0,
                        torch.device("cpu"))
    assert not rest.stopped_early and rest.steps == 40
