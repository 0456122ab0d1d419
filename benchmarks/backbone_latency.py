"""CPU latency per image of every model in the bundle, measured side by side in one run.

For each model (each at its own input size, batch 1, this machine's CPU threads):

* ``predict``: ``Predictor.predict_path`` on one chest CR (read + preprocess + forward + softmax),
  what ``dicom-covid predict`` and the PACS worker do per image;
* ``forward``: the bare network on a ready input tensor (single models only);
* parameters and the weights file size.

Ratios are to the bundle's default model, measured in the same run.

Usage::

    .venv/bin/python benchmarks/backbone_latency.py [--models a,b,...] [--runs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from predict_latency import _time  # same timing loop, benchmarks/ is on sys.path

from dicom_covid.bundle import Bundle
from dicom_covid.inference import Predictor
from dicom_covid.reader import read_image

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str, image: Path, runs: int) -> dict[str, object]:
    """Latency figures of one bundle model.

    Parameters
    ----------
    name : str
        Bundle model name.
    image : pathlib.Path
        A chest radiograph file.
    runs : int
        Timed runs after 3 warm-up runs.

    Returns
    -------
    dict
        ``model``, ``title``, ``input_size``, ``parameters``, ``weights_mb``,
        ``predict_ms`` and ``forward_ms`` (medians; ``forward_ms`` None for ensembles).
    """
    predictor = Predictor(model=name)
    facts = predictor.facts
    members = getattr(predictor, "members", None) or [predictor]
    params = sum(sum(p.numel() for p in m.model.parameters()) for m in members)
    weights = sum(m.facts.weights.stat().st_size for m in members) / 2**20
    forward = None
    if len(members) == 1:
        x = predictor.input_tensor(read_image(image))
        with torch.inference_mode():
            forward = statistics.median(_time(lambda: predictor.model(x), runs))
    predict = statistics.median(_time(lambda: predictor.predict_path(image), runs))
    return {
        "model": name,
        "title": facts.title,
        "input_size": facts.input_size,
        "parameters": params,
        "weights_mb": round(weights, 2),
        "predict_ms": round(predict, 2),
        "forward_ms": None if forward is None else round(forward, 2),
    }


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated (default: all available)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (>= 10)")
    parser.add_argument("--image", type=Path, default=ROOT / "sample_dicoms" / "chest_cr_mono1.dcm")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    bundle = Bundle()
    names = [n for n in args.models.split(",") if n] or bundle.available()
    default = bundle.default_model
    if default in names:  # the reference first
        names.remove(default)
        names.insert(0, default)
    rows = [measure(n, args.image, max(10, args.runs)) for n in names]
    ref = next((r for r in rows if r["model"] == default), rows[0])
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}; image {args.image.name}, "
        f"{max(10, args.runs)} warm runs, batch 1; ratios to {ref['model']}"
    )
    head = f"{'model':<22}{'px':>5}{'params M':>10}{'MB':>8}{'predict ms':>12}{'forward ms':>12}"
    print(head + f"{'ratio':>8}")
    for r in rows:
        fwd = "n/a" if r["forward_ms"] is None else f"{r['forward_ms']:.1f}"
        print(
            f"{r['model']:<22}{r['input_size']:>5}{r['parameters'] / 1e6:>10.2f}"
            f"{r['weights_mb']:>8.1f}{r['predict_ms']:>12.1f}{fwd:>12}"
            f"{r['predict_ms'] / ref['predict_ms']:>8.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(),
                    "image": args.image.name,
                    "runs": max(10, args.runs),
                    "reference": ref["model"],
                    "models": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
