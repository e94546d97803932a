"""Standalone sub-network files: weights (safetensors) + architecture (YAML), optionally ONNX.

``models.load_subnet(path)`` rebuilds the plain ``nn.Module`` from such a folder without the supernet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fileops import atomic_output, atomic_write_text
from models.search_space import ArchConfig, SearchSpace
from models.static import StaticSubnet

WEIGHTS = "model.safetensors"
ARCH = "arch.yaml"
ONNX = "model.onnx"


def save_subnet(model: StaticSubnet, out_dir: Path, *, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``arch.yaml`` into ``out_dir`` (each via a temp name + rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    description = {
        "search_space": model.space.to_dict(),
        "arch": model.arch.to_dict(),
        "num_classes": model.num_classes,
        **(extra or {}),
    }
    atomic_write_text(out_dir / ARCH, yaml.safe_dump(description, sort_keys=False))
    return out_dir


def load_subnet(path: str | Path, map_location: str = "cpu") -> StaticSubnet:
    """The standalone model saved by :func:`save_subnet` (a folder, or its ``arch.yaml``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    description = yaml.safe_load((folder / ARCH).read_text())
    space = SearchSpace.from_dict(description["search_space"], source=folder / ARCH)
    arch = ArchConfig.from_dict(description["arch"], source=folder / ARCH)
    model = StaticSubnet(space, arch, num_classes=int(description["num_classes"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=map_location))
    return model.eval()


def export_onnx(model: StaticSubnet, out_dir: Path, batch: int = 1) -> Path:
    """ONNX graph of the model at its own resolution (dynamic batch), checked to load with onnx."""
    import onnx

    out = Path(out_dir) / ONNX
    example = torch.zeros(batch, 3, model.arch.resolution, model.arch.resolution)
    model = model.eval()
    with atomic_output(out) as tmp:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        onnx.checker.check_model(str(tmp))
    return out
