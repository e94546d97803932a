"""Local weight sharing's training schedule (Distribution Consistent NAS, Pan et al. 2023, Algorithm 1) on top
of the sandwich rule.

- Warm-up (``model.sharing.warmup_epochs``): global sharing. Every sub-network runs candidate 0 and every
  other candidate of each block receives the same gradient, so all copies stay identical.
- Then one layer (supernet block) after another, ``epochs_per_layer`` each:
  - The sandwich's two middle sub-networks are changed to share layer l's operator (kernel, expansion),
    drawn each step (Alg. 1, lines 6–7).
  - Decided layers (< l) run each sub-network's assigned candidate; the others a random one.
  - ``assignment: learned``: when the pair runs different candidates at layer l, each one's gradient there
    also reaches the other's candidate, scaled by the matching degree λ = σ(w·(h̄_i − h̄_j) + b) (Eq. 8, 11).
    h̄ is the layer's input averaged over batch and space and zero-padded to the layer's widest input.
  - Every ``meta_every`` steps (w, b) take an SGD step on the look-ahead loss of Eq. 9/12,
    L(α_i; W_i − γ(g_i + λ g_j)).
  - At the end of layer l's epochs the N sampled architectures running it are clustered per operator into
    M groups (K-means over the rows of their matching-degree matrix). Each group gets the candidate that
    minimises its representatives' loss, one-to-one over the M! choices (Eq. 7). Layer l is then fixed.
- Fine-tuning: every assignment fixed, no exchange.

``assignment: random`` keeps this schedule but draws each architecture's candidate at random, with no
meta-network and no exchange (the paper's "Random Assign").
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_pipeline.device_transforms import rescale
from models.config import LocalSharingConfig
from models.mbconv.local_sharing import (
    LocalAssignment,
    block_positions,
    force_operator,
    operator_at,
    stage_operators,
)
from trainer.runtime.collectives import all_reduce_
from trainer.samplers import Subnet
from typedconfig import ConfigError


def layer_input_width(space, block: int) -> int:
    """The widest input supernet block ``block`` can receive."""
    stage, index = block_positions(space)[block]
    if index > 0:
        return max(space.stages[stage].widths)
    return max(space.stages[stage - 1].widths) if stage > 0 else max(space.stem.widths)


def meta_key(block: int, op: tuple[int, int]) -> str:
    return f"b{block}_k{op[0]}_e{op[1]}"


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run extra forwards without changing BatchNorm statistics: momentum 0 while inside (the running statistics
    keep their values; they may still be saved for a backward pass), batch counters restored on the way out."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class LocalSharing:
    """Algorithm 1's schedule, meta-networks and assignments for one supernet; every rank holds the same."""

    def __init__(
        self,
        supernet: nn.Module,
        config: LocalSharingConfig,
        *,
        steps_per_epoch: int,
        total_steps: int,
        label_loss: nn.Module,
        rank: int = 0,
        world: int = 1,
    ):
        self.supernet, self.config, self.space = supernet, config, supernet.space
        self.label_loss, self.rank, self.world = label_loss, rank, world
        self.num_blocks = len(supernet.blocks)
        self.assignment = LocalAssignment.sample(self.space, config.archs, config.candidates, config.seed)
        supernet.assignment = self.assignment
        self.warmup_steps = round(config.warmup_epochs * steps_per_epoch)
        self.layer_steps = max(1, round(config.epochs_per_layer * steps_per_epoch))
        self.finetune_start = self.warmup_steps + self.num_blocks * self.layer_steps
        if self.finetune_start > total_steps:
            raise ConfigError(
                f"warm-up ({self.warmup_steps} steps) + {self.num_blocks} layers × {self.layer_steps} steps needs "
                f"{self.finetune_start} steps; the run has {total_steps}: lower model.sharing.epochs_per_layer or "
                "warmup_epochs, or raise trainer.epochs",
                key="model.sharing.epochs_per_layer",
            )
        with torch.random.fork_rng(devices=[]):  # the training stream does not see the meta-networks
            torch.manual_seed(config.seed)
            self.meta = nn.ModuleDict(
                {
                    meta_key(b, op): nn.Linear(layer_input_width(self.space, b), 1)
                    for b in range(self.num_blocks)
                    for op in stage_operators(self.space, b)
                }
            )
        for linear in self.meta.values():
            nn.init.zeros_(linear.bias)  # λ starts near 1/2 for every pair
        self.meta_optimizer = torch.optim.SGD(self.meta.parameters(), lr=config.meta_lr)

    @property
    def learned(self) -> bool:
        return self.config.assignment == "learned"

    def phase(self, step: int) -> tuple[str, int | None]:
        """(``warmup`` | ``layer`` | ``finetune``, the layer being decided) at optimizer step ``step``."""
        if step < self.warmup_steps:
            return "warmup", None
        if step < self.finetune_start:
            return "layer", (step - self.warmup_steps) // self.layer_steps
        return "finetune", None

    def describe(self) -> str:
        parameters = sum(p.numel() for p in self.supernet.parameters())
        one = sum(p.numel() for p in self.supernet.blocks.parameters())
        return (
            f"local weight sharing ({self.config.assignment}): {self.config.candidates} candidates per layer, "
            f"{len(self.assignment.archs)} sampled archs; supernet {parameters / 1e6:.2f} M parameters "
            f"({one * (self.config.candidates - 1) / 1e6:.2f} M in the extra candidates); warm-up until step "
            f"{self.warmup_steps}, {self.layer_steps} steps per layer, fine-tuning from step {self.finetune_start}"
        )

    # ---------------------------------------------------------------------------------------- a step
    def prepare(
        self, step: int, subnets: list[Subnet], images: torch.Tensor, labels: torch.Tensor, lr: float
    ) -> tuple[list[Subnet], dict[str, torch.Tensor]]:
        """The step's sub-networks with their candidates and gradient routing (and, when due, a meta-network
        update); ``images`` (normalised, base resolution) and ``labels``: the step's first mini-batch."""
        phase, layer = self.phase(step)
        blocks, m = self.num_blocks, self.config.candidates
        if phase == "warmup":
            routing = {b: {c: 1.0 for c in range(1, m)} for b in range(blocks)}
            return [replace(s, candidates=(0,) * blocks, routing=routing) for s in subnets], {}
        rng = np.random.default_rng([self.config.seed, step])  # stateless: the same on every rank and on resume
        if phase == "layer" and len(subnets) >= 4:
            subnets = self._share_operator(subnets, layer, rng)
        subnets = [
            replace(s, candidates=self.assignment.candidates(s.arch, [int(c) for c in rng.integers(m, size=blocks)]))
            for s in subnets
        ]
        metrics: dict[str, torch.Tensor] = {}
        if phase == "layer" and self.learned and len(subnets) >= 4:
            a, b = subnets[1], subnets[2]
            difference = self.input_difference(layer, a, b, images)
            with torch.no_grad():
                lam = self.matching_degree(layer, operator_at(self.space, a.arch, layer), difference)
            metrics["local/lambda"] = lam.detach()
            ca, cb = a.candidates[layer], b.candidates[layer]
            if ca != cb:
                subnets[1] = replace(a, routing={layer: {cb: float(lam)}})
                subnets[2] = replace(b, routing={layer: {ca: float(lam)}})
            if step % self.config.meta_every == 0:
                metrics["local/meta_loss"] = self.meta_step(layer, a, b, images, labels, lr, difference)
        return subnets, metrics

    def _share_operator(self, subnets: list[Subnet], layer: int, rng: np.random.Generator) -> list[Subnet]:
        ops = stage_operators(self.space, layer)
        op = ops[int(rng.integers(len(ops)))]
        out = list(subnets)
        for i in (1, 2):
            out[i] = replace(out[i], arch=force_operator(self.space, out[i].arch, layer, op))
        return out

    def after_step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """After optimizer step ``step`` (1-based count of steps done): fix the layer whose epochs just ended."""
        done = step - self.warmup_steps
        if done <= 0 or done % self.layer_steps or done // self.layer_steps > self.num_blocks:
            return {}
        layer = done // self.layer_steps - 1
        if layer in self.assignment.decided:
            return {}
        values = self.decide(layer, images, labels) if self.rank == 0 else None
        if dist.is_initialized() and self.world > 1:
            box = [values]
            dist.broadcast_object_list(box, src=0)
            values = box[0]
        self.assignment.decided[layer] = values
        used = [v for v in values if v is not None]
        return {"local/layer_decided": float(layer), "local/candidate0_share": used.count(0) / max(1, len(used))}

    # ---------------------------------------------------------------------------------------- pieces
    def _inputs(self, subnet: Subnet, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.supernet.parameters()).dtype
        return rescale(images, subnet.arch.resolution).to(dtype)

    def layer_input(self, subnet: Subnet, layer: int, images: torch.Tensor) -> torch.Tensor:
        """``subnet``'s input to ``layer`` (its candidates set active)."""
        self.supernet.set_arch(subnet.arch, candidates=subnet.candidates)
        return self.supernet.forward_until(self._inputs(subnet, images), layer)

    def pooled_input(self, subnet: Subnet, layer: int, images: torch.Tensor) -> torch.Tensor:
        """h̄: ``subnet``'s input to ``layer``, averaged over batch and space, zero-padded to the widest."""
        h = self.layer_input(subnet, layer, images)
        h = h.to(next(self.meta.parameters()).dtype).mean(dim=(0, 2, 3))  # fp32 (the meta-networks' dtype)
        return F.pad(h, (0, layer_input_width(self.space, layer) - h.numel()))

    @torch.no_grad()
    def input_difference(self, layer: int, a: Subnet, b: Subnet, images: torch.Tensor) -> torch.Tensor:
        """h̄_a − h̄_b: what the meta-network of ``layer``'s operator reads for the pair (a, b)."""
        with preserved_buffers(self.supernet):
            return self.pooled_input(a, layer, images) - self.pooled_input(b, layer, images)

    def matching_degree(self, layer: int, op: tuple[int, int], difference: torch.Tensor) -> torch.Tensor:
        """λ of Eq. 11: the matching degree of a pair running ``op`` in ``layer``, from their input difference(s)."""
        return torch.sigmoid(self.meta[meta_key(layer, op)](difference)).squeeze(-1)

    def _layer_gradient(self, subnet: Subnet, layer: int, images, labels) -> dict[str, torch.Tensor]:
        """∂L(labels, subnet)/∂(its candidate's weights at ``layer``), leaving every .grad untouched."""
        block = self.supernet.block_module(layer, subnet.candidates[layer])
        params = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters()}
        self.supernet.set_arch(subnet.arch, candidates=subnet.candidates)
        self.supernet.overrides = {layer: params}
        try:
            loss = self.label_loss(self.supernet(self._inputs(subnet, images)), labels)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        finally:
            self.supernet.overrides = {}
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}

    def lookahead(
        self,
        layer: int,
        a: Subnet,
        b: Subnet,
        images: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        difference: torch.Tensor | None = None,
    ) -> Callable[[nn.Module], torch.Tensor]:
        """Eq. 9 as a function of a meta-network: L(α_a; W_a − lr·(g_a + λ g_b)) at ``layer``, where g are the
        label-loss gradients at the current weights and λ the meta-network's matching degree of (a, b)
        (``difference``: :meth:`input_difference` when already computed)."""
        if difference is None:
            difference = self.input_difference(layer, a, b, images)
        with preserved_buffers(self.supernet):
            grad_a = self._layer_gradient(a, layer, images, labels)
            grad_b = self._layer_gradient(b, layer, images, labels)
        base = {n: p.detach() for n, p in self.supernet.block_module(layer, a.candidates[layer]).named_parameters()}
        inputs = self._inputs(a, images)

        def loss(meta_net: nn.Module) -> torch.Tensor:
            lam = torch.sigmoid(meta_net(difference)).squeeze().to(inputs.dtype)
            stepped = {n: w - lr * (grad_a[n] + lam * grad_b[n]) for n, w in base.items()}
            self.supernet.set_arch(a.arch, candidates=a.candidates)
            self.supernet.overrides = {layer: stepped}
            try:
                with preserved_buffers(self.supernet):
                    return self.label_loss(self.supernet(inputs), labels)
            finally:
                self.supernet.overrides = {}

        return loss

    def meta_step(self, layer: int, a: Subnet, b: Subnet, images, labels, lr: float, difference) -> torch.Tensor:
        """One SGD step of the pair's meta-network on the look-ahead loss (Eq. 12), gradients averaged over ranks."""
        meta_net = self.meta[meta_key(layer, operator_at(self.space, a.arch, layer))]
        loss = self.lookahead(layer, a, b, images, labels, lr, difference)(meta_net)
        grads = torch.autograd.grad(loss, list(meta_net.parameters()))
        if dist.is_initialized() and self.world > 1:
            flat = all_reduce_(torch.cat([g.flatten() for g in grads]))
            flat /= self.world
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        self.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(meta_net.parameters(), grads):
            p.grad = g
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    @torch.no_grad()
    def decide(self, layer: int, images: torch.Tensor, labels: torch.Tensor) -> list[int | None]:
        """The candidate of every sampled arch at ``layer`` (None where it skips the layer)."""
        values: list[int | None] = [None] * len(self.assignment.archs)
        rng = np.random.default_rng([self.config.seed, 1, layer])
        m = self.config.candidates
        with preserved_buffers(self.supernet):
            for op in stage_operators(self.space, layer):
                members = self.assignment.members(layer, op)
                if not members:
                    continue
                if not self.learned:
                    for i in members:
                        values[i] = int(rng.integers(m))
                    continue
                subnets = [self._sampled(i) for i in members]
                features = torch.stack([self.pooled_input(s, layer, images) for s in subnets])
                degrees = self.matching_degree(layer, op, features[:, None] - features[None])
                clusters = self._clusters(degrees.float().numpy().astype(np.float64), min(m, len(members)))
                cost = np.zeros((clusters.max() + 1, m))
                for c in range(clusters.max() + 1):
                    in_cluster = [k for k in range(len(members)) if clusters[k] == c]
                    chosen = rng.choice(
                        in_cluster, size=min(self.config.representatives, len(in_cluster)), replace=False
                    )
                    for k in sorted(int(x) for x in chosen):
                        s = subnets[k]
                        h = self.layer_input(s, layer, images)  # the layers before are decided: shared by the trials
                        for candidate in range(m):
                            trial = (*s.candidates[:layer], candidate, *s.candidates[layer + 1 :])
                            self.supernet.set_arch(s.arch, candidates=trial)
                            cost[c, candidate] += float(self.label_loss(self.supernet.forward_from(h, layer), labels))
                best = min(
                    itertools.permutations(range(m), cost.shape[0]),
                    key=lambda perm: sum(cost[c, perm[c]] for c in range(cost.shape[0])),
                )
                for k, i in enumerate(members):
                    values[i] = int(best[clusters[k]])
        return values

    def _sampled(self, index: int) -> Subnet:
        arch = self.assignment.archs[index]
        return Subnet(f"sampled{index}", arch, candidates=self.assignment.candidates(arch))

    def _clusters(self, rows: np.ndarray, count: int) -> np.ndarray:
        """K-means labels of ``rows`` into ``count`` groups, renumbered by first appearance (deterministic)."""
        if len(rows) == count:
            return np.arange(count)
        from sklearn.cluster import KMeans

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical rows: fewer distinct clusters than asked
            raw = KMeans(n_clusters=count, n_init=10, random_state=self.config.seed).fit_predict(rows)
        order = {label: i for i, label in enumerate(dict.fromkeys(raw.tolist()))}
        return np.asarray([order[label] for label in raw.tolist()])

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The meta-networks (each rank's checkpoint state). The assignment, the same on every rank, goes into the
        checkpoint's client state, where consolidation also reads it: see :meth:`load_state_dict`."""
        return {"meta": {k: v.detach().clone() for k, v in self.meta.state_dict().items()}}

    def decided_by(self, step: int) -> list[int]:
        """The layers this schedule has decided once optimizer step ``step`` is done (see :meth:`after_step`)."""
        return list(range(min(self.num_blocks, max(0, (step - self.warmup_steps) // self.layer_steps))))

    def load_state_dict(self, state: dict, assignment: dict, *, step: int | None = None) -> None:
        """``state`` from :meth:`state_dict`, ``assignment`` from ``LocalAssignment.to_dict``; ``step``: the
        optimizer steps done, at which the decided layers must be those this schedule decides by then.  A resume
        that re-times the schedule (other steps per epoch: ``optimizer.gradient_accumulation_steps``,
        ``data.batch_size``, the world size) would otherwise skip the layers it places before ``step`` and
        never decided, or decide again one it places after: a ConfigError, which the run reports in one line."""
        self.assignment = LocalAssignment.from_dict(self.space, assignment)
        self.supernet.assignment = self.assignment
        self.meta.load_state_dict(state["meta"])
        decided, due = sorted(self.assignment.decided), self.decided_by(step) if step is not None else None
        if due is not None and decided != due:
            raise ConfigError(
                f"local sharing resumed at step {step} with layers {decided} decided, but this run's schedule "
                f"({self.warmup_steps} warm-up steps, {self.layer_steps} per layer) has decided {due} by then: "
                "the steps per epoch changed (optimizer.gradient_accumulation_steps, data.batch_size or the world "
                "size), which would skip layers; resume with the values the run was started with",
                key="optimizer.gradient_accumulation_steps",
            )
