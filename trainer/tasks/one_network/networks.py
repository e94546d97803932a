"""Build the student and teacher of a standalone run from their :class:`NetworkSource`, and save the result.

A network is an ``nn.Module`` plus the resolution it expects (a sub-network's own resolution; a torchvision
model's is the data's base resolution) and, for our spaces, its space and arch (what ``arch.yaml`` records).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from fileops import atomic_output, atomic_write_text
from models import build_subnet, load_named_archs, load_search_space, load_subnet, save_subnet
from models.config import ModelConfig
from models.export import ARCH, WEIGHTS, check_fits, fp32_state, stored_shapes
from models.ops import DynamicLinear
from trainer.config_keys import RESOLVED_CONFIG_NAME, current_keys
from trainer.consolidate import load_supernet
from trainer.runtime.evaluate import calibrated_subnet
from trainer.tasks.one_network.config import NetworkSource
from typedconfig import ConfigError, from_mapping, load_yaml

TORCHVISION_DESCRIPTION = "torchvision.yaml"


@dataclass(slots=True)
class Network:
    module: nn.Module
    resolution: int
    """Input resolution the network is fed at (the batch is rescaled to it)."""
    description: str
    torchvision: str | None = None
    """The torchvision model name, for a torchvision network."""

    @property
    def num_classes(self) -> int:
        return last_linear(self.module)[1].weight.shape[0]


def last_linear(module: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, layer) of the last linear layer of ``module``: the classifier of every model we build
    and of torchvision's classification models (ResNet ``fc``, MobileNet/EfficientNet ``classifier.N``)."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear | DynamicLinear)]
    if not found:
        raise ConfigError(f"{type(module).__name__} has no linear classifier to replace")
    return found[-1]


def replace_classifier(module: nn.Module, num_classes: int) -> None:
    """A freshly initialised classifier of ``num_classes`` outputs in place of the last linear layer."""
    name, old = last_linear(module)
    new = nn.Linear(old.weight.shape[1], num_classes, bias=old.bias is not None).to(old.weight.device)
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
    if hasattr(module, "num_classes"):
        module.num_classes = num_classes


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only ``torch.save`` file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        stored_shapes(path)  # a file that is not safetensors: one line naming it
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights file {path}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise ConfigError(f"{path} does not hold a state dict: entry {other!r} is not a tensor")
    return state


def _torchvision_fitted(name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """``torchvision.models.get_model(name)`` (on the current default device) with its classifier resized to
    the class count of the stored ``{classifier}.weight`` shape, when that differs."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    classifier, layer = last_linear(model)
    stored = shapes.get(f"{classifier}.weight")
    if stored is not None and stored[0] != layer.weight.shape[0]:
        replace_classifier(model, stored[0])
    return model


def torchvision_model(name: str, num_classes: int, weights: Path | None) -> nn.Module:
    """``torchvision.models.get_model(name)``; with ``weights`` its classifier takes the file's class count.
    The weights' names and shapes (a safetensors file's header, nothing loaded) are checked against the model
    built on the meta device first: a file that does not fit is refused before the model takes any memory."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"unknown torchvision classification model {name!r}")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    weights = Path(weights)
    if not weights.is_file():
        raise ConfigError(f"weights file {weights} not found")
    state = None if weights.suffix == ".safetensors" else read_state_dict(weights)
    shapes = stored_shapes(weights) if state is None else {k: tuple(v.shape) for k, v in state.items()}
    with torch.device("meta"):
        skeleton = _torchvision_fitted(name, shapes)
    check_fits(skeleton, shapes, weights, f"torchvision {name}", "name the model the weights were saved from")
    model = _torchvision_fitted(name, shapes)
    model.load_state_dict(read_state_dict(weights) if state is None else state)
    return model


def resolve_arch(spec: str, space):
    """``largest``, ``smallest`` or ``FILE:NAME`` (a model table) as an arch of ``space``."""
    if spec == "largest":
        return space.largest()
    if spec == "smallest":
        return space.smallest()
    path, sep, name = spec.rpartition(":")
    if not sep or not path:
        raise ConfigError(f"arch must be largest, smallest or FILE:NAME, got {spec!r}")
    table_space, archs = load_named_archs(path)
    if name not in archs:
        raise ConfigError(f"no model {name!r} in {path} (has {sorted(archs)})")
    if table_space.to_dict() != space.to_dict():
        raise ConfigError(f"{path} describes models of search space '{table_space.name}', not '{space.name}'")
    return archs[name]


Calibration = Callable[[], Iterable[torch.Tensor]]
"""Normalised training batches (any resolution) to recalibrate BatchNorm on, loaded when first needed."""


def load_network(
    source: NetworkSource, model: ModelConfig, *, base_resolution: int, calibration: Calibration, rank: int, device
) -> Network:
    """The network ``source`` names (see :class:`NetworkSource`), on ``device``, in train mode."""
    if source.torchvision is not None:
        module = torchvision_model(source.torchvision, model.num_classes, source.weights)
        return Network(module.to(device), base_resolution, source.describe(), torchvision=source.torchvision)
    if source.export is not None:
        return _load_export(Path(source.export), base_resolution, device)
    if source.run is not None:
        return _load_from_run(source, rank=rank, calibration=calibration, device=device)
    space = load_search_space(model.search_space)
    arch = resolve_arch(source.arch, space)
    module = build_subnet(space, arch, num_classes=model.num_classes, dropout=model.dropout)
    return Network(module.to(device), arch.resolution, source.describe())


def _load_export(folder: Path, base_resolution: int, device) -> Network:
    if (folder / TORCHVISION_DESCRIPTION).is_file():
        description = load_yaml(folder / TORCHVISION_DESCRIPTION)
        name = description.get("torchvision")
        if not isinstance(name, str):
            raise ConfigError("needs 'torchvision: NAME'", source=folder / TORCHVISION_DESCRIPTION)
        module = torchvision_model(name, 1, folder / WEIGHTS)
        return Network(module.to(device), base_resolution, f"export {folder}", torchvision=name)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} does not exist: export a sub-network first (the search's --export, or `make demo` for the "
            "tiny recipes' runs/tiny_cpu/search/exports/tiny_m)"
        )
    if not (folder / ARCH).is_file():
        raise ConfigError(f"{folder} is not an exported model (no {ARCH} or {TORCHVISION_DESCRIPTION})")
    module = load_subnet(folder).train()
    return Network(module.to(device), module.arch.resolution, f"export {folder}")


def _load_from_run(source: NetworkSource, *, rank: int, calibration: Calibration, device) -> Network:
    run = Path(source.run)
    if not (run / RESOLVED_CONFIG_NAME).is_file():
        raise ConfigError(f"{run} is not a training run folder (no {RESOLVED_CONFIG_NAME})")
    recorded = current_keys(load_yaml(run / RESOLVED_CONFIG_NAME), source=run / RESOLVED_CONFIG_NAME)
    if recorded.get("task", {}).get("name", "sandwich") != "sandwich":
        raise ConfigError(f"{run} trained one network, not a supernet: use export: {run / 'final'}")
    model = from_mapping(ModelConfig, recorded.get("model", {}), prefix="model", source=run / RESOLVED_CONFIG_NAME)
    supernet = load_supernet(run, model, rank, device)
    arch = resolve_arch(source.arch, supernet.space)
    module = calibrated_subnet(supernet, arch, calibration(), across_ranks=True).train()
    return Network(module, arch.resolution, source.describe())


def save_network(network: Network, folder: Path, preprocessing: dict | None = None) -> Path:
    """``folder/arch.yaml`` + ``model.safetensors`` (a sub-network, reloadable with ``models.load_subnet``), or
    ``torchvision.yaml`` + ``model.safetensors``; either is an ``export:`` source of a later run.  The YAML
    records the input ``preprocessing`` when given."""
    module = network.module
    extra = {} if preprocessing is None else {"preprocessing": preprocessing}
    if network.torchvision is None:
        return save_subnet(module, folder, extra=extra)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = fp32_state(module)
    with atomic_output(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    description = {"torchvision": network.torchvision, "num_classes": network.num_classes, **extra}
    text = yaml.safe_dump(description, sort_keys=False)
    atomic_write_text(folder / TORCHVISION_DESCRIPTION, text)
    return folder


FINAL_DIR = "final"
