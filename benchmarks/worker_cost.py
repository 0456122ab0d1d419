"""What the PACS worker costs per image, against the network's own forward pass.

Side by side in one run, on a full-size CR made from a sample (``chest_cr_mono1.dcm`` resized to
``--columns x --rows``, default 2000 x 2500, 16-bit), with the default model (or ``--model``),
``--batch`` copies of it per pass (default 1), every figure per image:

* ``forward``: the bare network forward on a ready input tensor;
* ``floor`` (issue 13's floor): decode the source's pixels (``pixel_array``) + the model's input
  pipeline (for the default model: 224-px resize, the lung U-Net of the lung crop, crop, resize,
  CLAHE) + forward + CAM backward: the least an explained result can cost;
* ``net floor``: the same without the input pipeline (decode + forward + CAM backward on a ready
  tensor), for the ratio to the classifier's own work alone;
* ``two-pass``: the worker's path before the one-pass change: ``dcmread`` → ``read_dataset`` →
  ``Predictor.predict`` → Grad-CAM by ``pytorch_grad_cam`` with its own forward and full backward
  → outline → SR → SC at the source's full resolution → encode both (image by image);
* ``one-pass``: today's worker path: ``dcmread`` → :func:`dicom_covid.results.analyse_batch`
  (one forward for prediction and CAM, one U-Net pass per batch, outline and SC made from the
  CAMs at their own sizes) → encode both;
* the pieces of the one-pass path (read, decode + normalise, one-pass predict + CAM, outline,
  SR build, SC build, encode), image by image.

The overlay of the two-pass column is today's (vectorised, look-up table), so that column is a
lower bound of what the old code cost. Usage::

    .venv/bin/python benchmarks/worker_cost.py [--model NAME] [--batch 1] [--runs 15] [--threads N]

Prints medians in milliseconds per image and the ratios to the forward and to both floors.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch

from dicom_covid.explain import CAM_METHODS, Explainer, _place, hot_region_outline, resolve_layer
from dicom_covid.inference import Predictor
from dicom_covid.reader import XrayImage, read_dataset
from dicom_covid.results import analyse_batch, build_heatmap_sc, build_sr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_latency import _p, _time  # noqa: E402


def full_size_cr(rows: int, cols: int) -> bytes:
    """The sample CR resized to ``rows x cols``, as a DICOM file in memory."""
    ds = pydicom.dcmread(ROOT / "sample_dicoms" / "chest_cr_mono1.dcm")
    arr = ds.pixel_array
    big = cv2.resize(arr, (cols, rows), interpolation=cv2.INTER_LINEAR).astype(arr.dtype)
    ds.PixelData = big.tobytes()
    ds.Rows, ds.Columns = rows, cols
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def two_pass_heatmap(predictor: Predictor, image: XrayImage) -> np.ndarray:
    """The Grad-CAM as made before the one-pass path: ``pytorch_grad_cam``'s own forward and
    full backward per member network, placed on the source."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    heats = []
    for member in predictor.members:
        x, info = member.prepared(image)
        x = x[None].detach().clone().requires_grad_(True)
        layer = resolve_layer(member.model, member.facts.gradcam_layer)
        cls = getattr(pytorch_grad_cam, CAM_METHODS["gradcam"])
        target = ClassifierOutputTarget(list(member.labels).index("covid"))
        with torch.enable_grad(), cls(model=member.model, target_layers=[layer]) as cam:
            small = cam(input_tensor=x, targets=[target])[0]
        member.model.zero_grad(set_to_none=True)
        small = np.clip(np.nan_to_num(np.asarray(small, dtype=np.float32)), 0.0, 1.0)
        heats.append(_place(small, image.shape, info.get("lung_box")))
    heat = heats[0]
    for other in heats[1:]:
        heat += other
    return np.clip(heat / len(heats), 0.0, 1.0)


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle model (default: the default model)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each path (>= 5)")
    parser.add_argument("--batch", type=int, default=1, help="images per pass (copies of the CR)")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    runs, n = max(5, args.runs), max(1, args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = full_size_cr(args.rows, args.columns)
    predictor = Predictor(model=args.model)
    explainer = Explainer(predictor)
    source = pydicom.dcmread(io.BytesIO(data))
    image = read_dataset(source)
    images = [image] * n
    nets = explainer.members or [explainer]
    ready = [
        torch.stack([x for x, _ in e.predictor.prepared_batch(images)]).to(e.predictor.device)
        for e in nets
    ]

    def forward() -> None:
        with torch.inference_mode():
            for e, x in zip(nets, ready, strict=True):
                e.predictor.model(x)

    def cam_pass(e: Explainer, x: torch.Tensor | None) -> None:
        """Forward + CAM backward of one network (input prepared here when ``x`` is None)."""
        acts: list[torch.Tensor] = []

        def keep(_m, _a, out, acts=acts):
            acts.append(out.detach().requires_grad_(True))
            return acts[-1]

        handle = e.layer.register_forward_hook(keep)
        try:
            if x is None:
                with torch.no_grad():
                    x = torch.stack([t for t, _ in e.predictor.prepared_batch(images)])
                    x = x.to(e.predictor.device)
            with torch.enable_grad():
                logits = e.predictor.model(x)
                torch.autograd.grad(logits[:, 0].sum(), acts[0])
        finally:
            handle.remove()

    def decode() -> None:
        for _ in range(n):
            pydicom.dcmread(io.BytesIO(data)).pixel_array  # noqa: B018 (decode)

    def floor() -> None:
        decode()
        for e in nets:
            cam_pass(e, None)

    def net_floor() -> None:
        decode()
        for e, x in zip(nets, ready, strict=True):
            cam_pass(e, x)

    def two_pass() -> None:
        for _ in range(n):
            ds = pydicom.dcmread(io.BytesIO(data))
            img = read_dataset(ds)
            prediction = predictor.predict(img)
            heat = two_pass_heatmap(predictor, img)
            outline = hot_region_outline(heat)
            sr = build_sr(ds, prediction, outline)
            sc = build_heatmap_sc(ds, img, prediction, heat, max_side=None)
            _encode(sr), _encode(sc)

    def one_pass() -> None:
        sources = [pydicom.dcmread(io.BytesIO(data)) for _ in range(n)]
        for result in analyse_batch(sources, predictor, explainer, batch_size=n):
            if isinstance(result, Exception):
                raise result
            _encode(result.sr), _encode(result.sc)

    prediction, heat = explainer.predict_and_place([image])[0]
    outline = hot_region_outline(heat)
    sr = build_sr(source, prediction, outline)
    sc = build_heatmap_sc(source, image, prediction, heat)
    pieces: dict[str, Callable[[], object]] = {
        "  read (dcmread)": lambda: pydicom.dcmread(io.BytesIO(data)),
        "  decode + normalise": lambda: read_dataset(pydicom.dcmread(io.BytesIO(data))),
        "  predict + CAM (one pass)": lambda: explainer.predict_and_place([image]),
        "  outline": lambda: hot_region_outline(heat),
        "  SR build": lambda: build_sr(source, prediction, outline),
        "  SC build": lambda: build_heatmap_sc(source, image, prediction, heat),
        "  encode SR + SC": lambda: (_encode(sr), _encode(sc)),
    }
    # The contenders interleaved, round by round, so that load changes hit them alike.
    fns = {
        "forward": forward,
        "floor": floor,
        "net floor": net_floor,
        "two-pass": two_pass,
        "one-pass": one_pass,
    }
    timed: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            timed[name] += [t / n for t in _time(fn, 1, warmup=0)]
    piece_times = {name: _time(fn, runs, warmup=1) for name, fn in pieces.items()}

    med = {k: statistics.median(v) for k, v in timed.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(
        f"model: {predictor.facts.name}, image: {args.columns} x {args.rows} CR (16-bit), "
        f"SC {sc.Columns} x {sc.Rows}, {runs} interleaved runs, batch {n}, ms per image"
    )
    print(
        f"{'':<30}{'median ms':>10}{'p90 ms':>10}{'/ forward':>10}{'/ floor':>10}{'/ net fl.':>10}"
    )
    for name in fns:
        m = med[name]
        print(
            f"{name:<30}{m:>10.1f}{_p(timed[name], 0.9):>10.1f}"
            f"{m / med['forward']:>10.2f}{m / med['floor']:>10.2f}{m / med['net floor']:>10.2f}"
        )
    print("pieces of one-pass (image by image):")
    for name, values in piece_times.items():
        print(f"{name:<30}{statistics.median(values):>10.1f}{_p(values, 0.9):>10.1f}")
    print(
        f"two-pass / one-pass: {med['two-pass'] / med['one-pass']:.2f}; one-pass / forward: "
        f"{med['one-pass'] / med['forward']:.1f}; one-pass / floor: "
        f"{med['one-pass'] / med['floor']:.2f}; one-pass / net floor: "
        f"{med['one-pass'] / med['net floor']:.2f}"
    )


if __name__ == "__main__":
    main()
