"""Standalone sub-network files: weights (safetensors) + architecture (YAML), optionally ONNX.

``models.load_subnet(path)`` rebuilds the plain ``nn.Module`` from such a folder without the supernet.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from fileops import atomic_output, atomic_write_text
from models.families import Arch, Space, build_subnet, family_of, space_from_dict
from typedconfig import ConfigError, load_yaml

WEIGHTS = "model.safetensors"
ARCH = "arch.yaml"
ONNX = "model.onnx"


def fp32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict on the CPU, floating-point tensors as float32 (a bf16 training copy included)."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }


def save_subnet(model: torch.nn.Module, out_dir: Path, *, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``arch.yaml`` into ``out_dir`` (each via a temp name + rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = fp32_state(model)
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


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MAX_CLASSES = 1_000_000


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in the safetensors file ``path``, read from its header alone (nothing is
    loaded); a file that is not safetensors is a one-line :class:`ConfigError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as exc:  # SafetensorError (not safetensors, header too large), OSError
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{path} is not a readable safetensors file ({reason}); write it again with safetensors' save_file "
            "(or give a weights-only torch.save file a .pt name)"
        ) from exc


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def check_fits(
    model: torch.nn.Module, stored: dict[str, tuple[int, ...]], path: Path, what: str, next_step: str
) -> None:
    """A one-line :class:`ConfigError` naming ``path`` and the first tensor that differs, unless ``stored``
    (name → shape, e.g. :func:`stored_shapes`) has exactly the names and shapes of ``model``'s state dict
    (``model`` may live on the meta device: nothing is allocated)."""
    needed = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in needed if k not in stored]
    unexpected = [k for k in stored if k not in needed]
    differ = [k for k in needed if k in stored and stored[k] != needed[k]]
    if not (missing or unexpected or differ):
        return
    parts = []
    if differ:
        first = differ[0]
        parts.append(
            f"{len(differ)} tensor(s) of another shape, first {first}: {_shape(stored[first])} stored, "
            f"{_shape(needed[first])} needed"
        )
    if missing:
        parts.append(f"{len(missing)} missing, first {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]}")
    raise ConfigError(f"{path} does not fit {what}: " + "; ".join(parts) + f" ({next_step})")


def read_description(folder: Path) -> tuple[Space, Arch, int]:
    """(space, arch, num_classes) of an exported folder, checked before anything is built: ``arch.yaml`` is
    read with the config loader's limits, its space's values must lie in their bounds (``models.limits``),
    the arch must lie in its space, and the tensors it implies must be exactly those stored in
    ``model.safetensors``, name by name and shape by shape (so a crafted arch cannot make us allocate a model
    far larger than the file, and a mismatch is one line, not a traceback from ``load_state_dict``)."""
    arch_file, weights = folder / ARCH, folder / WEIGHTS
    description = load_yaml(arch_file)
    missing = sorted({"search_space", "arch", "num_classes"} - set(description))
    if missing:
        raise ConfigError(f"missing key(s) {missing}", source=arch_file)
    space = space_from_dict(description["search_space"], source=arch_file)
    arch = space.arch_from_dict(description["arch"], source=arch_file)
    problems = arch.problems(space)
    if problems:
        raise ConfigError("arch outside its search space: " + "; ".join(problems), key="arch", source=arch_file)
    num_classes = description["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(
            f"must be an integer in [1, {MAX_CLASSES}], got {num_classes!r}", key="num_classes", source=arch_file
        )
    if not weights.is_file():
        raise ConfigError(f"{weights} not found", source=arch_file)
    shapes = stored_shapes(weights)
    stored = sum(math.prod(shape) for k, shape in shapes.items() if not k.endswith(BUFFER_SUFFIXES))
    _, expected = family_of(space).cost(space, arch, num_classes)
    if stored != expected:  # first, from the header alone: even a model on the meta device costs its layers
        raise ConfigError(
            f"describes a model of {expected:,} parameters but {weights} holds {stored:,}", source=arch_file
        )
    with torch.device("meta"):  # shapes without memory
        skeleton = build_subnet(space, arch, num_classes=num_classes)
    check_fits(skeleton, shapes, weights, f"the model {arch_file} describes", "export the sub-network again")
    return space, arch, num_classes


def load_subnet(path: str | Path, map_location: str = "cpu") -> torch.nn.Module:
    """The standalone model saved by :func:`save_subnet` (a folder, or its ``arch.yaml``), in eval mode;
    a description that does not match its weights is a :class:`ConfigError` (see :func:`read_description`)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    space, arch, num_classes = read_description(folder)
    model = build_subnet(space, arch, num_classes=num_classes)
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=map_location))
    return model.eval()


def export_onnx(model: torch.nn.Module, out_dir: Path, batch: int = 1) -> Path:
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
