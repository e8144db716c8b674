"""Training loops for the two ReDi stages: resumable, seeded, with progress lines.

The loops take tensors and modules, not files; ``redi.workflow.stages`` does the file handling. The budget
is either epochs (full passes over the data) or a number of optimizer steps (``StageTrainConfig.steps``,
the same training time whatever the line's size). Each pass ends with a checkpoint (model,
optimiser, scheduler, RNG states, history, best-validation state) written atomically, so a killed
run, rerun with the same arguments, continues from the last finished pass.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from redi.core.config import StageTrainConfig
from redi.core.errors import ConfigError, WeightsError
from redi.core.utils import atomic_torch_save, format_seconds, load_torch_file


@dataclass
class TrainResult:
    """What a finished stage reports.

    ``epochs`` is the number of passes over the data done in all (a step budget's last pass may be
    partial), ``steps`` the optimizer steps done in all (both include a resumed run's earlier
    passes). ``best`` is set when ``keep_best`` chose a pass: its "epoch", "step" and "val_loss".
    """

    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    steps: int = 0
    stopped_early: bool = False  # the stage's time cap (max_minutes) ended it before its budget
    best: dict[str, float] | None = None


def steps_per_pass(batch_size: int, num_samples: int) -> int:
    """Optimizer steps in one full pass over ``num_samples`` images in batches of ``batch_size``.

    A lone leftover image sits the pass out (BatchNorm needs two samples), unless it is the only one.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 2:
        return num_samples
    if batch_size == 1:
        return 0  # every batch would be a lone image
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest >= 2 else 0)


def with_pass_floor(stage: StageTrainConfig, num_samples: int) -> StageTrainConfig:
    """The stage with its step budget raised to ``stage.min_passes`` passes over ``num_samples``
    images where the steps give fewer; the milestones scale with it, so the schedule keeps its shape."""
    per_pass = steps_per_pass(stage.batch_size, num_samples)
    floor = stage.min_passes * per_pass
    if stage.steps <= 0 or floor <= stage.steps:
        return stage
    scale = floor / stage.steps
    return dataclasses.replace(stage, steps=floor, milestones=[round(m * scale) for m in stage.milestones])


def budget_steps(stage: StageTrainConfig, num_samples: int) -> int:
    """The stage's budget in optimizer steps: ``stage.steps``, or ``epochs`` full passes when steps is 0."""
    return stage.steps if stage.steps > 0 else stage.epochs * steps_per_pass(stage.batch_size, num_samples)


def budget_passes(stage: StageTrainConfig, num_samples: int) -> int:
    """Passes over the data the stage's budget needs (the last one may be partial with a step budget).

    With ``stage.steps == 0`` it is ``stage.epochs``. With a step budget it is
    ceil(steps / steps per pass); a line too small to give a single step per pass raises.
    """
    if stage.steps <= 0:
        return stage.epochs
    per_pass = steps_per_pass(stage.batch_size, num_samples)
    if per_pass == 0:
        raise ConfigError(f"a budget of {stage.steps} steps cannot be done: {num_samples} images in batches of "
                         f"{stage.batch_size} give no batch of two or more (BatchNorm needs two); "
                         f"use batch_size >= 2 and at least one image")
    return -(-stage.steps // per_pass)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked for; full precision on the CPU (training there is fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def fingerprint(payload: dict) -> str:
    """Short hash of what defines a run, so a checkpoint of another run is never resumed."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]




def _load_checkpoint(path: Path, run_id: str, log) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = load_torch_file(path, "checkpoint", "starting from scratch")
    except WeightsError as exc:  # a corrupt checkpoint must not block a fresh run
        log(str(exc))
        return None
    if not isinstance(state, dict) or state.get("run_id") != run_id:
        log(f"checkpoint {path} belongs to another configuration; starting from scratch")
        return None
    return state


def _estimate_line(total_steps: int, passes: int, num_samples: int, steps_at_start: int, steps_done: int,
                   timing: list[float], started: float) -> str:
    """'budget N steps (~E passes over M images), estimated T': T is this call's time, from timed steps.

    ``timing`` holds the clock after each step of this call. The first step is a warm-up
    (allocations, kernel choice) and is left out of the rate when later ones exist.
    """
    if len(timing) >= 2:
        per_step = (timing[-1] - timing[0]) / (len(timing) - 1)
    else:
        per_step = timing[0] - started
    elapsed = timing[-1] - started
    estimate = elapsed + per_step * (total_steps - steps_done)
    resumed = f", resuming at step {steps_at_start}" if steps_at_start else ""
    return (f"budget {total_steps} steps (~{passes} passes over {num_samples} images){resumed}, "
            f"estimated {format_seconds(estimate)} ({per_step:.3g} s/step)")


def run_training(
    name: str,
    model: nn.Module,
    stage: StageTrainConfig,
    num_samples: int,
    step: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    checkpoint_path: Path,
    run_id: str,
    seed: int,
    device: torch.device,
    amp: bool = True,
    stream=sys.stderr,
    validate: Callable[[], float] | None = None,
    keep_best: bool = False,
) -> TrainResult:
    """Pass loop with AdamW + MultiStepLR (the paper's optimiser and schedule), resumable per pass.

    ``step(indices)`` computes the loss of one mini-batch (given sample indices) and its parts.

    The budget: ``stage.steps > 0`` means exactly that many optimizer steps, over as many shuffled
    passes as needed (the last may stop early), with the LR schedule stepped per optimizer step
    (milestones count steps); ``stage.steps == 0`` means ``stage.epochs`` full passes with the
    schedule stepped per pass (milestones count epochs). Each pass's order depends on
    (seed, pass) only, so a resumed run sees the same batches as an uninterrupted one. A step
    budget is raised to ``stage.min_passes`` passes where it gives fewer (:func:`with_pass_floor`);
    ``stage.max_minutes`` stops the stage when that much time has passed in this call (logged,
    ``stopped_early``; the checkpoint lets a rerun finish the budget).

    Once the first steps are timed (a warm-up step, then two), one line gives the budget and the
    estimated time; every pass then logs its mean loss parts, steps done and an ETA on steps.

    ``validate()``, when given, is called after each pass with the model in eval mode (and no
    gradients); its value goes into the history as "val_loss". With ``keep_best`` the model state
    of the lowest val_loss is kept (also in the checkpoint, so a resumed run keeps it) and loaded
    into the model at the end.
    """
    if keep_best and validate is None:
        raise ValueError("keep_best=True needs a validate callable: the best pass is the one of lowest val_loss")

    def log(message: str) -> None:
        print(f"[{name}] {message}", file=stream, flush=True)

    raised = with_pass_floor(stage, num_samples)
    if raised is not stage:
        log(f"{num_samples} images: budget raised from {stage.steps} to {raised.steps} steps for the floor of "
            f"{stage.min_passes} passes (milestones {raised.milestones})")
    stage = raised
    by_steps = stage.steps > 0
    total_steps = budget_steps(stage, num_samples)
    total_passes = budget_passes(stage, num_samples)  # raises for a step budget that cannot be done
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=stage.milestones, gamma=stage.gamma)
    result = TrainResult(epochs=0)
    start_pass = steps_done = 0
    best: dict | None = None  # {"state", "epoch", "step", "val_loss"}
    state = _load_checkpoint(checkpoint_path, run_id, log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        result.history = state["history"]
        start_pass = result.resumed_from = state["epoch"]
        # checkpoints from before step budgets have no "step": they counted full epochs
        steps_done = state.get("step", start_pass * steps_per_pass(stage.batch_size, num_samples))
        best = state.get("best")
        log(f"resuming from checkpoint {checkpoint_path} at pass {start_pass}, step {steps_done}/{total_steps}")
    else:
        torch.manual_seed(seed)

    deadline = time.perf_counter() + 60.0 * stage.max_minutes if stage.max_minutes > 0 else float("inf")

    def finished() -> bool:
        return steps_done >= total_steps if by_steps else result.epochs >= stage.epochs

    def out_of_time() -> bool:
        return time.perf_counter() >= deadline

    result.epochs, result.steps = start_pass, steps_done
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    if finished():
        if total_steps == 0 and state is None:
            log("budget 0 steps: nothing to train")
    else:
        model.train()
    steps_at_start = steps_done
    timing: list[float] = []  # the clock after each of this call's first optimizer steps, for the estimate
    estimated = False
    while not finished():
        if out_of_time():
            result.stopped_early = True
            log(f"WARNING: time cap of {stage.max_minutes:g} min (train.<stage>.max_minutes) reached at step "
                f"{steps_done}/{total_steps}; keeping the model so far (rerun to resume the rest)")
            break
        epoch = result.epochs
        pass_start = time.perf_counter()
        generator.manual_seed(seed * 100003 + epoch)  # order depends on (seed, pass) only: resumable
        order = torch.randperm(num_samples, generator=generator)
        totals: dict[str, float] = {}
        batches = images = 0
        for begin in range(0, num_samples, stage.batch_size):
            if (by_steps and steps_done >= total_steps) or out_of_time():
                break  # the budget (or the time cap) ends inside this pass
            indices = order[begin:begin + stage.batch_size]
            if len(indices) < 2 and num_samples >= 2:
                continue  # BatchNorm needs two samples: a lone leftover sits out this pass (order changes each pass)
            with autocast_context(device, amp):
                loss, parts = step(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if by_steps:
                scheduler.step()  # milestones count optimizer steps
            batches += 1
            images += len(indices)
            steps_done += 1
            for key, value in {"loss": float(loss.detach()), **parts}.items():  # float() also syncs CUDA
                totals[key] = totals.get(key, 0.0) + value
            if not estimated:
                timing.append(time.perf_counter())
                # a warm-up step and two timed ones (or all of the budget if it is shorter)
                if len(timing) == 3 or steps_done >= total_steps:
                    log(_estimate_line(total_steps, total_passes, num_samples, steps_at_start, steps_done,
                                       timing, started))
                    estimated = True
        if not by_steps:
            scheduler.step()  # milestones count epochs
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        record = {"epoch": epoch + 1, "step": steps_done, **means, "lr": optimizer.param_groups[0]["lr"]}
        if validate is not None:
            model.eval()
            with torch.no_grad():
                record["val_loss"] = float(validate())
            model.train()
            if keep_best and (best is None or record["val_loss"] < best["val_loss"]):
                best = {"state": copy.deepcopy(model.state_dict()), "epoch": epoch + 1, "step": steps_done,
                        "val_loss": record["val_loss"]}
        seconds = time.perf_counter() - pass_start
        record["seconds"] = seconds
        result.history.append(record)
        result.epochs, result.steps = epoch + 1, steps_done
        # ETA on steps, not passes: a step budget's last pass may be short
        eta = (time.perf_counter() - started) / max(steps_done - steps_at_start, 1) * (total_steps - steps_done)
        parts_text = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        val_text = f" val_loss {record['val_loss']:.4g}" if "val_loss" in record else ""
        log(f"pass {epoch + 1}/{total_passes} step {steps_done}/{total_steps} {parts_text}{val_text} "
            f"lr {record['lr']:.3g}  {images / max(seconds, 1e-9):.1f} img/s  "
            f"{seconds:.1f} s/pass  ETA {format_seconds(eta)}")
        atomic_torch_save({
            "run_id": run_id, "epoch": epoch + 1, "step": steps_done, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "history": result.history, "best": best,
        }, checkpoint_path)
    if keep_best and best is not None:
        model.load_state_dict(best["state"])
        result.best = {k: best[k] for k in ("epoch", "step", "val_loss")}
        log(f"keeping the model of pass {best['epoch']} (step {best['step']}), lowest val_loss {best['val_loss']:.4g}")
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
