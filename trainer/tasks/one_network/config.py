"""``task: {name: one_network, ...}``: train one network (the *student*) instead of a supernet, on the labels
and/or distilled from a fixed *teacher* (AlphaNet §4.3, Tables 5–6), or fine-tuned from a searched
sub-network (Fig. 5) or transferred to a new dataset (Table 4).  (Before 0.2 this was the ``standalone``
section.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from trainer.paths import repo_relative
from trainer.tasks import TaskConfig
from typedconfig import Range, check_ranges, to_mapping


@dataclass(kw_only=True, slots=True)
class NetworkSource:
    """Where a network comes from; exactly one of the four forms:

    - ``export``: a folder written by the search's ``--export`` or by a standalone run (``RUN/final``):
      ``arch.yaml`` + ``model.safetensors``; its weights are loaded.
    - ``run`` + ``arch``: a sub-network of a trained supernet run (its newest checkpoint), with the supernet's
      weights and BatchNorm recalibrated on training batches.
    - ``arch`` alone: a freshly initialised sub-network of ``model.search_space`` (PyTorch's layer defaults).
    - ``torchvision``: a torchvision classification model by name, with ``weights`` (a state-dict file,
      ``.safetensors`` or a weights-only ``torch.save``) or freshly initialised; nothing is downloaded.

    ``arch`` is ``largest``, ``smallest``, or ``FILE:NAME`` (a model table such as
    ``configs/tiny_models.yaml:tiny_m``)."""

    export: Path | None = None
    run: Path | None = None
    arch: str | None = None
    torchvision: str | None = None
    weights: Path | None = None

    def __post_init__(self) -> None:
        forms = [self.export is not None, self.run is not None, self.torchvision is not None]
        if sum(forms) > 1:
            raise ValueError("give one of export, run (+ arch), arch, torchvision (+ weights)")
        if sum(forms) == 0 and self.arch is None:
            raise ValueError("give one of export, run (+ arch), arch, torchvision (+ weights)")
        if self.run is not None and self.arch is None:
            raise ValueError("run needs arch: largest, smallest or FILE:NAME")
        if self.arch is not None and (self.export is not None or self.torchvision is not None):
            raise ValueError("arch goes with run, or alone; not with export or torchvision")
        if self.weights is not None and self.torchvision is None:
            raise ValueError("weights goes with torchvision (an export folder holds its own weights)")

    def config_paths(self, anchor) -> None:
        """The model table of ``arch: FILE:NAME`` is a path of the config (:mod:`typedconfig.paths`)."""
        if self.arch is not None and self.arch not in ("largest", "smallest"):
            table, sep, name = self.arch.rpartition(":")
            if sep and table:
                self.arch = f"{anchor('arch', Path(table))}:{name}"

    def describe(self) -> str:
        if self.export is not None:
            return f"export {self.export}"
        if self.run is not None:
            return f"{self.arch} of run {self.run}"
        if self.torchvision is not None:
            return f"torchvision {self.torchvision}" + (f" ({self.weights})" if self.weights else " (fresh)")
        return f"fresh {self.arch}"


TeacherLogits = Literal["on_the_fly", "cached"]


@dataclass(kw_only=True, slots=True)
class OneNetworkConfig(TaskConfig):
    """One network (the student), optionally distilled from a fixed teacher with ``loss.kd_loss``."""

    name: str = "one_network"
    student: NetworkSource
    teacher: NetworkSource | None = None
    """The fixed teacher (eval mode, never updated); null: train on the labels only."""
    teacher_logits: TeacherLogits = "on_the_fly"
    """``on_the_fly``: the teacher sees each augmented batch (at its own resolution) every step.  ``cached``: its
    logits on every un-augmented training image (eval transform) are computed once into ``RUN/teacher_logits``
    and reused every epoch: no teacher forward per step, but the target ignores the augmentation."""
    label_weight: Annotated[float, Range(ge=0)] = 0.0
    """Weight of the label-smoothed CE on the student's logits; the KD term is weighted by ``loss.kd_weight``.
    With no teacher the student trains on the labels alone (weight 1 if this is 0)."""
    new_classifier: bool = False
    """Replace the student's last linear layer with a fresh one of ``model.num_classes`` outputs (transfer to a
    new dataset); otherwise the student must already have ``model.num_classes`` outputs."""

    def __post_init__(self) -> None:
        check_ranges(self, "task")

    def weights_identity(self) -> dict:
        """The student and teacher are part of what the weights mean (the keys of the former ``standalone``
        section, so that checkpoints written before 0.2 keep their hash); paths inside the repository as
        repository-relative, as they were written before paths were stored absolute."""
        mapping = to_mapping(self)
        del mapping["name"]
        for source in (mapping["student"], mapping["teacher"]):
            for key in ("export", "run", "weights"):
                if source and source.get(key) is not None:
                    source[key] = repo_relative(source[key])
            if source and source.get("arch") and ":" in source["arch"]:
                table, _, name = source["arch"].rpartition(":")
                source["arch"] = f"{repo_relative(table)}:{name}"
        return mapping
