"""Speed of the exported detector beside torch: one detector, every runtime, in one process.

For each profile: a detector with random weights (speed does not depend on them) and a prompt
bank of ``--bank`` demo images, exported with ``redi.methods.redi.export.export_onnx``; then the same
preprocessed demo images through torch fp32, torch with the configured precision
(``model.recover.precision=auto``: bf16 recover net on CPUs with bf16 units), onnxruntime (CPU)
and, when installed, OpenVINO (CPU; fp32 hint and its default hint). Each row also gives the
largest score difference to torch fp32. Example:

    python bench/bench_export.py --threads 2 --batches 1 8 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from redi.core.config import load_config
from redi.data.demo import generate_pair
from redi.methods.onnx import export_openvino, onnx_session, run_onnx
from redi.methods.redi.export import export_onnx, torch_fp32
from redi.core.images import preprocess
from redi.methods.redi.detector import Detector
from redi.core.utils import use_bf16

Runner = Callable[[torch.Tensor], np.ndarray]


def cpu_name() -> str:
    """``lscpu``'s model name (the CPU the numbers belong to)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def demo_batch(count: int, size: int, split: str) -> torch.Tensor:
    """``count`` bottle_caps demo images, preprocessed to ``size`` (the project's one path)."""
    return preprocess([generate_pair("bottle_caps", 256, 0, split, i).image for i in range(count)], size)


def build_detector(profile: str, bank: int) -> Detector:
    cfg = load_config(profile=profile)
    torch.manual_seed(0)
    detector = Detector(cfg, num_prompts=bank)
    images = demo_batch(bank, cfg.data.image_size, "train")
    with torch.inference_mode():
        embeddings = detector.backbone(images).embedding
    detector.set_prompts(embeddings, images, [f"train/good/{i:03d}" for i in range(bank)])
    detector.threshold.fill_(1.0)
    return detector.eval()


def runners(detector: Detector, folder: Path, threads: int) -> dict[str, Runner]:
    """name -> function(images) -> scores, all on the same detector."""

    def torch_runner(fp32: bool) -> Runner:
        def run(x: torch.Tensor) -> np.ndarray:
            if fp32:
                with torch_fp32(detector):
                    return detector.predict(x).score.numpy()
            return detector.predict(x).score.numpy()
        return run

    bf16 = use_bf16(detector.cfg.model.recover.precision, torch.device("cpu"))
    out = {"torch fp32": torch_runner(True),
           f"torch auto ({'bf16' if bf16 else 'fp32'} recover net)": torch_runner(False)}
    started = time.perf_counter()
    onnx_path = export_onnx(detector, folder / "detector.onnx")
    print(f"  export: {time.perf_counter() - started:.1f} s, {onnx_path.stat().st_size / 2**20:.1f} MB", flush=True)
    session = onnx_session(onnx_path, threads)
    out["onnxruntime (fp32)"] = lambda x: run_onnx(session, x)[0]
    try:
        import openvino as ov
    except ImportError:
        print("  OpenVINO is not installed: skipped (pip install openvino)", flush=True)
        return out
    xml = export_openvino(onnx_path, folder / "detector.xml")
    core = ov.Core()
    for label, config in (("f32 hint", {"INFERENCE_PRECISION_HINT": "f32"}), ("default hint", {})):
        compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads, **config})
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO picked on this CPU
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        out[f"OpenVINO {ov.__version__.split('-')[0]} ({label}: {precision})"] = (
            lambda x, c=compiled: c(x.numpy())[c.output(0)])
    return out


def time_runner(run: Runner, x: torch.Tensor, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    run(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["cpu", "fast"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"CPU: {cpu_name()} ({platform.machine()}), {args.threads} threads for every runtime, torch "
             f"{torch.__version__}, prompt bank of {args.bank} demo images, random weights, median of "
             f"{args.repeats} after a warm-up.", "",
             "| profile | runtime | batch | ms / image | images / s | vs torch fp32 | vs torch auto "
             "| max abs score diff to torch fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            print(f"{profile}:", flush=True)
            detector = build_detector(profile, args.bank)
            run_by_name = runners(detector, Path(tmp), args.threads)
            for batch in args.batches:
                x = demo_batch(batch, detector.image_size, "test_good")
                reference = run_by_name["torch fp32"](x)
                seconds = {name: time_runner(run, x, args.repeats) for name, run in run_by_name.items()}
                fp32, auto = list(seconds.values())[:2]
                for name, value in seconds.items():
                    diff = np.abs(run_by_name[name](x) - reference).max()
                    lines.append(f"| {profile} | {name} | {batch} | {value / batch * 1e3:.1f} | {batch / value:.2f} "
                                 f"| {fp32 / value:.2f}x | {auto / value:.2f}x | {diff:.1e} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
