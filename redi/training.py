"""Training loops for the two ReDi stages: resumable, seeded, with progress lines.

The loops take tensors and modules, not files; ``redi.stages`` does the file handling. Each epoch
ends with a checkpoint (model, optimiser, scheduler, RNG states, history) written atomically, so
a killed run, rerun with the same arguments, continues from the last finished epoch.
"""

from __future__ import annotations

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

from redi.config import StageTrainConfig
from redi.errors import WeightsError
from redi.utils import atomic_torch_save, format_seconds, load_torch_file


@dataclass
class TrainResult:
    """What a finished stage reports."""

    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


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
) -> TrainResult:
    """Generic epoch loop with AdamW + MultiStepLR (the paper's optimiser and schedule).

    ``step(indices)`` computes the loss of one mini-batch (given sample indices) and its parts.
    """

    def log(message: str) -> None:
        print(f"[{name}] {message}", file=stream, flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=stage.milestones, gamma=stage.gamma)
    result = TrainResult(epochs=stage.epochs)
    start_epoch = 0
    state = _load_checkpoint(checkpoint_path, run_id, log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        result.history = state["history"]
        start_epoch = result.resumed_from = state["epoch"]
        log(f"resuming from checkpoint {checkpoint_path} at epoch {start_epoch}/{stage.epochs}")
    else:
        torch.manual_seed(seed)
    if start_epoch >= stage.epochs:
        return result

    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, stage.epochs):
        epoch_start = time.perf_counter()
        generator.manual_seed(seed * 100003 + epoch)  # order depends on (seed, epoch) only: resumable
        order = torch.randperm(num_samples, generator=generator)
        totals: dict[str, float] = {}
        batches = 0
        for begin in range(0, num_samples, stage.batch_size):
            indices = order[begin:begin + stage.batch_size]
            if len(indices) < 2 and num_samples >= 2:
                continue  # BatchNorm needs two samples: a lone leftover sits out this epoch (order changes each epoch)
            with autocast_context(device, amp):
                loss, parts = step(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batches += 1
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value
        scheduler.step()
        means = {k: v / max(batches, 1) for k, v in totals.items()}
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, **means, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
        result.history.append(record)
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - started) / done * (stage.epochs - epoch - 1)
        parts_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        log(f"epoch {epoch + 1}/{stage.epochs} {parts_text}  {num_samples / seconds:.1f} img/s  "
            f"{seconds:.1f} s/epoch  ETA {format_seconds(eta)}")
        atomic_torch_save({
            "run_id": run_id, "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "history": result.history,
        }, checkpoint_path)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
