"""Latency of ``predict`` for one image versus a bare forward pass of the same network.

Measured side by side in one run on this machine's CPU:

* ``predict``: read the DICOM (decode, LUTs, normalisation) + preprocess + forward + softmax,
  i.e. ``Predictor.predict_path`` — what ``dicom-covid predict`` does per image;
* ``forward``: ``model(x)`` on a ready input tensor, batch 1.

Usage::

    .venv/bin/python benchmarks/predict_latency.py [--model NAME] [--runs 30] [--image FILE]

Prints the medians (and p90) in milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from dicom_covid.inference import Predictor
from dicom_covid.reader import read_image

ROOT = Path(__file__).resolve().parent.parent


def _time(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle model (default: the default model)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs (>= 20)")
    parser.add_argument("--image", type=Path, default=ROOT / "sample_dicoms" / "chest_cr_mono1.dcm")
    args = parser.parse_args()
    runs = max(20, args.runs)

    predictor = Predictor(model=args.model)
    x = predictor.input_tensor(read_image(args.image))
    with torch.inference_mode():
        forward = _time(lambda: predictor.model(x), runs)
    predict = _time(lambda: predictor.predict_path(args.image), runs)
    read = _time(lambda: read_image(args.image), runs)

    med_f, med_p, med_r = (statistics.median(v) for v in (forward, predict, read))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"model: {predictor.facts.name} ({predictor.facts.input_size}px), image: "
        f"{args.image.name} {read_image(args.image).shape}, {runs} warm runs, batch 1"
    )
    print(f"{'':<26}{'median ms':>10}{'p90 ms':>10}")
    print(f"{'predict (read+infer)':<26}{med_p:>10.1f}{_p(predict, 0.9):>10.1f}")
    print(f"{'  of which read_image':<26}{med_r:>10.1f}{_p(read, 0.9):>10.1f}")
    print(f"{'bare forward pass':<26}{med_f:>10.1f}{_p(forward, 0.9):>10.1f}")
    print(f"ratio predict / forward: {med_p / med_f:.2f}")


if __name__ == "__main__":
    main()
