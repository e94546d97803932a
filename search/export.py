"""Export of chosen sub-networks: safetensors + arch YAML + ONNX, each checked against the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import torch

from models import load_subnet, save_subnet
from models.export import export_onnx
from search.evolution import Candidate, pareto_front


class ExportError(ValueError):
    """An ``--export`` spec that names nothing exportable."""


def check_spec(spec: str) -> None:
    """Raise ValueError for an ``--export`` value that is neither a name nor ``pareto@MFLOPS``."""
    if spec.startswith("pareto@"):
        float(spec.split("@", 1)[1])


def choose(spec: str, population: list[Candidate], marked: dict[str, Candidate]) -> tuple[str, Candidate]:
    """(folder name, candidate) for a marked model's name or the best front candidate within ``pareto@MFLOPS``."""
    if spec.startswith("pareto@"):
        budget = float(spec.split("@", 1)[1])
        fitting = [c for c in pareto_front(population) if c.mflops <= budget]
        if not fitting:
            raise ExportError(f"no Pareto candidate within {budget} MFLOPs")
        return f"pareto_{budget:g}mflops", max(fitting, key=lambda c: c.top1)
    if spec in marked:
        return spec, marked[spec]
    raise ExportError(f"--export {spec}: not a marked model ({sorted(marked)}) nor pareto@MFLOPS")


def export_subnet(
    model: torch.nn.Module, candidate: Candidate, folder: Path, preprocessing: dict | None = None
) -> tuple[Path, float, float]:
    """Write ``model`` into ``folder`` (``arch.yaml`` records its cost, top-1 and the input ``preprocessing``);
    returns (folder, max |reloaded − model|, max |ONNX − model|)."""
    model = model.cpu().eval()
    extra = {"mflops": candidate.mflops, "top1": candidate.top1}
    if preprocessing is not None:
        extra["preprocessing"] = preprocessing
    folder = save_subnet(model, folder, extra=extra)
    onnx_path = export_onnx(model, folder)
    reloaded = load_subnet(folder)
    x = torch.randn(2, 3, candidate.arch.resolution, candidate.arch.resolution)
    with torch.no_grad():
        expected = model(x).numpy()
        torch_diff = float(np.abs(reloaded(x).numpy() - expected).max())
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_diff = float(np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max())
    return folder, torch_diff, onnx_diff
