"""The GPU path: ``--device cuda`` runs the networks in channels_last under mixed precision.

Where torch finds a CUDA GPU, the default model's probabilities and Grad-CAM on the GPU must
agree with the CPU's (bfloat16/float16 autocast: probabilities within 0.03, heat maps
correlated above 0.95); elsewhere those tests skip with the reason, and what runs everywhere is
the refusal: asking for ``cuda`` on a machine without one is a clear error, not a crash.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_covid.errors import DicomCovidError
from dicom_covid.inference import Predictor
from dicom_covid.reader import read_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_dicoms").glob("*.dcm"))
CLI = Path(sys.executable).with_name("dicom-covid")

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine (torch.cuda)"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DicomCovidError, match="finds no CUDA GPU"):
        Predictor(device="cuda")
    out = subprocess.run(
        [str(CLI), "predict", str(SAMPLES[0]), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "finds no CUDA GPU" in out.stderr and "--device cpu" in out.stderr


def test_unknown_device_is_a_clear_error() -> None:
    with pytest.raises(DicomCovidError, match="unknown torch device 'gpu0'"):
        Predictor(device="gpu0")


@needs_cuda
def test_gpu_agrees_with_the_cpu() -> None:
    from dicom_covid.explain import Explainer

    images = [read_image(p) for p in SAMPLES]
    cpu, gpu = Predictor(device="cpu"), Predictor(device="cuda")
    assert gpu.amp_dtype in (torch.bfloat16, torch.float16)
    on_cpu = Explainer(cpu).predict_and_explain(images)
    on_gpu = Explainer(gpu).predict_and_explain(images)
    for (p_cpu, h_cpu), (p_gpu, h_gpu) in zip(on_cpu, on_gpu, strict=True):
        for label in cpu.labels:
            assert abs(p_cpu.probabilities[label] - p_gpu.probabilities[label]) <= 0.03
        assert np.corrcoef(h_cpu.ravel(), h_gpu.ravel())[0, 1] > 0.95


@needs_cuda
def test_predict_command_on_the_gpu() -> None:
    out = subprocess.run(
        [str(CLI), "predict", *map(str, SAMPLES), "--device", "cuda", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('"decision"') == len(SAMPLES)
