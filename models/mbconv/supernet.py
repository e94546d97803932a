"""The weight-sharing supernet over a :class:`SearchSpace`.

Set a sub-network with :meth:`AlphaNetSupernet.set_arch`, then call the module as usual.  Every rank
must run the same sub-network at the same step (DeepSpeed ZeRO reduces whole parameter tensors).

Under ``model.sharing: local`` each block also holds M − 1 more candidate copies (``candidate_blocks``,
identical at initialisation); ``set_arch`` picks one per block from the attached
:class:`~models.mbconv.local_sharing.LocalAssignment` (or explicitly), and ``routing`` lets a block's forward
send a scaled copy of its gradient to other candidates (global sharing during warm-up, DC-NAS's gradient
exchange) without changing its output.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import init_weights
from models.mbconv.local_sharing import LocalAssignment
from models.mbconv.search_space import ArchConfig, SearchSpace, StageSpace
from models.mbconv.subnet_plan import SubnetPlan, plan_subnet, supernet_block_indices
from models.ops import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicLinear,
    DynamicSqueezeExcite,
    checkpointed,
    conv_layout,
    drop_path,
    expanded_channels,
)


class DynamicMBConvBlock(nn.Module):
    """Inverted residual: [1×1 expand + BN + act] → k×k depthwise + BN + act → [SE] → 1×1 project + BN.

    The shortcut is the identity when the active shape is unchanged, otherwise an average pool
    (stride 2) and/or a plain 1×1 convolution without BN (channel change).
    """

    def __init__(self, in_widths: tuple[int, ...], stage: StageSpace, stride: int, bn_momentum: float | None):
        super().__init__()
        max_in, max_out = max(in_widths), max(stage.widths)
        max_expand = max(stage.expands)
        max_mid = max(expanded_channels(max_in, e) for e in stage.expands)
        self.stride = stride
        self.expand_conv = DynamicConv2d(max_in, max_mid, 1) if max_expand > 1 else None
        self.expand_bn = DynamicBatchNorm2d(max_mid, momentum=bn_momentum) if max_expand > 1 else None
        self.dw_conv = DynamicDepthwiseConv2d(max_mid, max(stage.kernels), stride)
        self.dw_bn = DynamicBatchNorm2d(max_mid, momentum=bn_momentum)
        self.se = DynamicSqueezeExcite(max_mid) if stage.se else None
        self.project_conv = DynamicConv2d(max_mid, max_out, 1)
        self.project_bn = DynamicBatchNorm2d(max_out, momentum=bn_momentum)
        always_identity = stride == 1 and len(in_widths) == 1 and in_widths == stage.widths
        self.shortcut_conv = None if always_identity else DynamicConv2d(max_in, max_out, 1)
        # Active configuration, set by the supernet.
        self.out_channels = max_out
        self.kernel_size = max(stage.kernels)
        self.expand = max_expand
        self.drop_path_rate = 0.0  # used only when the supernet runs with regularisation on

    def forward(self, x: torch.Tensor, drop_path_rate: float = 0.0) -> torch.Tensor:
        in_channels = x.shape[1]
        h = x
        if self.expand != 1:
            h = F.silu(self.expand_bn(self.expand_conv(h, expanded_channels(in_channels, self.expand))))
        h = F.silu(self.dw_bn(self.dw_conv(h, self.kernel_size)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project_conv(h, self.out_channels))
        if self.stride == 1 and in_channels == self.out_channels:
            if self.training and drop_path_rate > 0:
                h = drop_path(h, drop_path_rate)
            return x + h
        shortcut = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        if in_channels != self.out_channels:
            shortcut = self.shortcut_conv(shortcut, self.out_channels)
        return h + shortcut


class AlphaNetSupernet(nn.Module):
    """Stem → stages of dynamic MBConv blocks → MBPool head → classifier, all sliceable."""

    zero3_leaf_types = (DynamicMBConvBlock,)
    """Under ZeRO-3 a block's parameters are gathered together (``trainer.runtime.engine.mark_zero3_leaves``)."""

    channels_last = True
    """Run the convolutions on channels-last tensors (see :func:`models.ops.conv_layout`); a runtime switch
    (``engine.channels_last``) that changes no weight."""

    activation_checkpointing = False
    """Recompute each block's activations in the backward pass instead of storing them (in training mode with
    gradients enabled); BatchNorm running statistics are still updated once.  A runtime switch
    (``engine.activation_checkpointing``) that changes no weight."""

    def __init__(self, space: SearchSpace, config: ModelConfig):
        super().__init__()
        self.space = space
        self.config = config
        momentum = config.bn_momentum
        max_stem = max(space.stem.widths)
        self.stem_conv = DynamicConv2d(3, max_stem, space.stem.kernel, space.stem.stride)
        self.stem_bn = DynamicBatchNorm2d(max_stem, momentum=momentum)

        self.stage_blocks = supernet_block_indices(space)
        blocks: list[DynamicMBConvBlock] = []
        in_widths = space.stem.widths
        for stage, indices in zip(space.stages, self.stage_blocks):
            for i in range(len(indices)):
                blocks.append(DynamicMBConvBlock(in_widths, stage, stage.stride if i == 0 else 1, momentum))
                in_widths = stage.widths
        self.blocks = nn.ModuleList(blocks)

        max_last = max(space.stages[-1].widths)
        max_expanded = space.head.expand * max_last
        self.final_expand_conv = DynamicConv2d(max_last, max_expanded, 1)
        self.final_expand_bn = DynamicBatchNorm2d(max_expanded, momentum=momentum)
        self.feature_mix_conv = DynamicConv2d(max_expanded, max(space.head.widths), 1)
        self.classifier = DynamicLinear(max(space.head.widths), config.num_classes)

        init_weights(self, config.init)
        if config.zero_init_residual_bn:
            for block in self.blocks:
                nn.init.zeros_(block.project_bn.weight)
        self._set_drop_path_rates()
        extra = config.sharing.candidates - 1 if config.sharing.name == "local" else 0
        self.candidate_blocks = (
            nn.ModuleList(nn.ModuleList(copy.deepcopy(block) for _ in range(extra)) for block in self.blocks)
            if extra
            else None
        )
        self.assignment: LocalAssignment | None = None
        """Local sharing: which candidate each architecture uses per block (None: candidate 0 everywhere)."""
        self.candidates: tuple[int, ...] = (0,) * len(self.blocks)
        """The active candidate of every block."""
        self.routing: dict[int, dict[int, float]] = {}
        """Block → {other candidate: scale}: the forward adds ``scale · (w − w.detach())`` of that candidate's
        weights to the active ones (same output, scaled gradient sent there)."""
        self.overrides: dict[int, dict[str, torch.Tensor]] = {}
        """Block → parameters to run instead of the active candidate's (a meta-network's look-ahead)."""
        self.plan: SubnetPlan | None = None
        self.regularize = False
        self.set_arch(space.largest())

    @property
    def num_candidates(self) -> int:
        return 1 + (len(self.candidate_blocks[0]) if self.candidate_blocks else 0)

    def block_module(self, index: int, candidate: int = 0) -> DynamicMBConvBlock:
        """Candidate ``candidate`` of supernet block ``index`` (0: ``blocks[index]``)."""
        return self.blocks[index] if candidate == 0 else self.candidate_blocks[index][candidate - 1]

    def block_prefix(self, index: int, candidate: int) -> str:
        """State-dict prefix of that candidate's tensors."""
        return f"blocks.{index}." if candidate == 0 else f"candidate_blocks.{index}.{candidate - 1}."

    def candidates_for(self, arch: ArchConfig) -> tuple[int, ...]:
        """The candidate of every block for ``arch``: from the assignment (0 where undecided), else all 0."""
        if self.assignment is None:
            return (0,) * len(self.blocks)
        return self.assignment.candidates(arch)

    @property
    def arch(self) -> ArchConfig:
        """The active sub-network."""
        return self._arch

    def _set_drop_path_rates(self) -> None:
        """Rate ``drop_connect × index / total`` on the blocks of the last ``drop_connect_stages`` stages, 0
        elsewhere (``model.drop_connect`` is the paper's name for stochastic depth)."""
        total = len(self.blocks)
        last = self.config.drop_connect_stages
        eligible = {i for stage in self.stage_blocks[len(self.stage_blocks) - last :] for i in stage} if last else set()
        for idx, block in enumerate(self.blocks):
            block.drop_path_rate = self.config.drop_connect * idx / total if idx in eligible else 0.0

    def set_arch(
        self,
        arch: ArchConfig,
        *,
        regularize: bool = False,
        candidates: tuple[int, ...] | None = None,
        routing: dict[int, dict[int, float]] | None = None,
    ) -> None:
        """Make ``arch`` the active sub-network; ``regularize`` turns dropout and drop-path on. Local sharing:
        ``candidates`` (one per block; default :meth:`candidates_for`) and gradient ``routing``."""
        self.plan = plan_subnet(self.space, arch)
        self._arch = arch
        self.regularize = regularize
        if candidates is not None and (
            len(candidates) != len(self.blocks) or not all(0 <= c < self.num_candidates for c in candidates)
        ):
            raise ValueError(f"candidates {candidates}: need {len(self.blocks)} values in [0, {self.num_candidates})")
        self.candidates = tuple(candidates) if candidates is not None else self.candidates_for(arch)
        self.routing = dict(routing or {})
        for planned in self.plan.blocks:
            for candidate in range(self.num_candidates):
                block = self.block_module(planned.supernet_index, candidate)
                block.out_channels, block.kernel_size = planned.out_channels, planned.kernel
                block.expand = planned.expand

    def active_block_indices(self, arch: ArchConfig | None = None) -> list[int]:
        """Supernet block indices run by ``arch`` (default: the active one)."""
        plan = self.plan if arch is None else plan_subnet(self.space, arch)
        return [block.supernet_index for block in plan.blocks]

    def _block_and_params(self, index: int) -> tuple[DynamicMBConvBlock, dict[str, torch.Tensor] | None]:
        """The active candidate of block ``index`` and the parameters to run it with (None: its own)."""
        block = self.block_module(index, self.candidates[index])
        params = self.overrides.get(index)
        if params is None and self.routing.get(index):
            others = [(self.block_module(index, c), scale) for c, scale in self.routing[index].items()]
            params = {}
            for name, weight in block.named_parameters():
                for other, scale in others:
                    twin = other.get_parameter(name)
                    weight = weight + scale * (twin - twin.detach())
                params[name] = weight
        return block, params

    @staticmethod
    def _call_block(
        block: DynamicMBConvBlock, params: dict[str, torch.Tensor] | None, x: torch.Tensor, drop_path_rate: float
    ) -> torch.Tensor:
        if params is None:
            return block(x, drop_path_rate)
        return torch.func.functional_call(block, params, (x, drop_path_rate), strict=False)

    def _run_block(self, index: int, x: torch.Tensor, drop_path_rate: float) -> torch.Tensor:
        block, params = self._block_and_params(index)
        return self._call_block(block, params, x, drop_path_rate)

    def _run_block_checkpointed(self, index: int, x: torch.Tensor, drop_path_rate: float) -> torch.Tensor:
        """:meth:`_run_block` with activation checkpointing.  The backward's recompute runs the candidate,
        parameters (overrides, routing) and active shape of this forward, whatever ``set_arch`` or
        ``overrides`` say by the time the backward runs."""
        block, params = self._block_and_params(index)
        shape = (block.out_channels, block.kernel_size, block.expand)

        def run(x: torch.Tensor) -> torch.Tensor:
            current = (block.out_channels, block.kernel_size, block.expand)
            block.out_channels, block.kernel_size, block.expand = shape
            try:
                return self._call_block(block, params, x, drop_path_rate)
            finally:
                block.out_channels, block.kernel_size, block.expand = current

        return checkpointed(run, x)

    def forward_until(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The active sub-network's input to supernet block ``index`` (which it must run)."""
        if index not in {planned.supernet_index for planned in self.plan.blocks}:
            raise ValueError(f"the active sub-network does not run block {index}")
        x = conv_layout(x, self.channels_last)
        x = F.silu(self.stem_bn(self.stem_conv(x, self.plan.stem.out_channels)))
        for planned in self.plan.blocks:
            if planned.supernet_index == index:
                return x
            x = self._run_block(planned.supernet_index, x, 0.0)
        raise AssertionError("unreachable")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_layout(x, self.channels_last)
        x = F.silu(self.stem_bn(self.stem_conv(x, self.plan.stem.out_channels)))
        return self.forward_from(x, self.plan.blocks[0].supernet_index)

    def forward_from(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The active sub-network's logits from ``x``, its input to supernet block ``index`` (see
        :meth:`forward_until`): the blocks from ``index`` on, then the head."""
        plan = self.plan
        regularize = self.regularize and self.training
        run_block = (
            self._run_block_checkpointed
            if self.activation_checkpointing and self.training and torch.is_grad_enabled()
            else self._run_block
        )
        for planned in plan.blocks:
            if planned.supernet_index >= index:
                i = planned.supernet_index
                x = run_block(i, x, self.blocks[i].drop_path_rate if regularize else 0.0)
        x = F.silu(self.final_expand_bn(self.final_expand_conv(x, plan.head.expanded)))
        x = x.mean(dim=(2, 3), keepdim=True)
        x = F.silu(self.feature_mix_conv(x, plan.head.width)).flatten(1)
        if regularize and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, training=True)
        return self.classifier(x)
