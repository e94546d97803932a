"""Trainer building blocks: environment resolver, DeepSpeed config, LR schedule, optimizer."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from trainer_helpers import child_env, free_port

from trainer.runtime.distributed import (
    SHM_DIR,
    DistributedEnvError,
    configure_threads,
    first_host,
    init_distributed,
    local_world_size,
    parse_first_host,
    port_for_job,
    resolve,
)
from trainer.runtime.ds_config import build_ds_config, global_batch_size
from trainer.runtime.optim import ClippedSGD, param_groups
from trainer.runtime.schedule import lr_at
from trainer.sections import EngineConfig, OptimizerConfig

REPO = Path(__file__).resolve().parents[2]

SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "5",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "1234",
}


def test_resolver_single_process():
    env = resolve({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    with socket.socket() as s:  # a free port (not always 29500, which another single run may hold)
        s.bind(("127.0.0.1", env.master_port))
    assert resolve({"MASTER_PORT": "4567"}).master_port == 4567


def test_run_dir_argument_is_taken_literally(capsys, tmp_path, monkeypatch):
    """Not parsed as YAML (`#` starts no comment); relative to the shell's folder, like any argument."""
    from trainer.config import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "--run-dir", "runs/a #b"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run_dir"] == str(tmp_path / "runs/a #b")


@pytest.mark.parametrize("script", ["slurm/alphanet.sh", "slurm/search.sh"])
def test_slurm_templates_refuse_a_bad_gpu_count(script):
    env = {**os.environ, "GPUS_PER_NODE": "zero"}
    done = subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "GPUS_PER_NODE must be a whole number" in done.stderr, done.stderr


def test_resolver_launcher_variables():
    env = resolve({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3,
        4,
        1,
        "n1",
        1234,
        "launcher",
    )
    # The deepspeed launcher passes --local_rank instead of LOCAL_RANK in some versions.
    env = resolve({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, local_rank_arg=1)
    assert env.local_rank == 1


def test_resolver_slurm_variables():
    env = resolve(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu07"
    assert env.master_port == 29500 + 1234 % 20000
    assert resolve({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}).master_addr == "head"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"RANK": "0"}, "not ['WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT']"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "LOCAL_RANK"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            "outside world size",
        ),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "not an integer"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
    ],
)
def test_resolver_rejects_half_set_environments(env, fragment):
    with pytest.raises(DistributedEnvError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        resolve(env)


def test_resolver_rejects_local_rank_without_launcher():
    with pytest.raises(DistributedEnvError, match="--local_rank=1"):
        resolve({}, local_rank_arg=1)


@pytest.mark.parametrize(
    "nodelist, first", [("node[01-04,07]", "node01"), ("gpu[7,9]", "gpu7"), ("single", "single"), ("a,b", "a")]
)
def test_node_list_parser(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_first_host_asks_scontrol_and_falls_back_to_the_parser(monkeypatch):
    calls = []

    def scontrol(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="n3\nn4\n", stderr="")

    monkeypatch.setattr(subprocess, "run", scontrol)
    assert first_host("n[3-4]") == "n3" and calls[0][:3] == ["scontrol", "show", "hostnames"]

    def missing(args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(subprocess, "run", missing)
    assert first_host("node[01-04,07]") == "node01"


def test_slurm_port_rule_is_the_resolver_s():
    env = resolve({**SLURM, "SLURM_JOB_ID": "31234"})
    assert env.master_port == port_for_job(31234) == 29500 + 31234 % 20000
    for template in ("slurm/alphanet.sh", "slurm/search.sh"):  # one rule: the templates leave it to the resolver
        assert "MASTER_PORT=" not in (REPO / template).read_text()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_batch_arithmetic_and_explicit_settings(stage):
    tc = EngineConfig(zero_stage=stage, precision="bf16" if stage == 1 else "fp32")
    oc = OptimizerConfig(gradient_accumulation_steps=2)
    config = build_ds_config(tc, oc, micro_batch=32, world_size=64)
    assert config["train_batch_size"] == 32 * 64
    assert config["gradient_accumulation_steps"] == 1  # the trainer accumulates with explicit boundaries
    assert config["gradient_clipping"] == 0.0  # clipping by value happens in the optimizer
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_allow_untested_optimizer"] is True
    assert ("bf16" in config) == (stage == 1) and ("data_types" in config) == (stage == 1)
    assert global_batch_size(oc, micro_batch=32, world_size=64) == 4096


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=0.8, total_steps=1000, warmup_steps=100)
    assert lr_at(0, **kw) == pytest.approx(0.8 * 0.001)
    assert lr_at(50, **kw) == pytest.approx(0.8 * (0.001 + 0.999 * 0.5))
    assert lr_at(100, **kw) == pytest.approx(0.8)
    assert lr_at(550, **kw) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1000, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, base_lr=1.0, total_steps=10, warmup_steps=0) == pytest.approx(0.5)


def test_no_weight_decay_on_batchnorm_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }


def test_clipped_sgd_clips_by_value_and_skips_non_finite():
    p = nn.Parameter(torch.zeros(3))
    opt = ClippedSGD([p], lr=1.0, momentum=0.0, nesterov=False, clip_value=0.5)
    p.grad = torch.tensor([2.0, -0.1, -3.0])
    opt.step()
    torch.testing.assert_close(p.data, torch.tensor([-0.5, 0.1, 0.5]))
    assert not opt.last_step_skipped
    p.grad = torch.tensor([float("nan"), 0.0, 0.0])
    before = p.data.clone()
    opt.step()
    assert opt.last_step_skipped and torch.equal(p.data, before)


def test_trainer_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="zero_stage"):
        EngineConfig(zero_stage=4)
    from trainer.tasks.sandwich import SandwichConfig

    with pytest.raises(ValueError, match="num_subnets"):
        SandwichConfig(num_subnets=1)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LOCAL_WORLD_SIZE": "4"}, 4),
        ({"LOCAL_SIZE": "2"}, 2),
        ({"SLURM_NTASKS_PER_NODE": "8"}, 8),
        ({"SLURM_TASKS_PER_NODE": "8(x2)"}, 8),
        ({}, 1),
    ],
)
def test_local_world_size_from_each_launcher(env, expected):
    assert local_world_size(env) == expected


def test_threads_are_the_cores_shared_by_the_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        assert configure_threads(None, 4) == 4 == torch.get_num_threads()
        assert configure_threads(None, 32) == 1  # never zero
        assert configure_threads(3, 4) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_without_kd_every_subnet_trains_on_the_labels():
    from losses import LossConfig, build_kd_loss, build_label_loss
    from models import ArchSampler, ModelConfig, build_supernet
    from trainer.samplers import sample_sandwich
    from trainer.tasks.sandwich import SandwichStep

    assert build_kd_loss(LossConfig(kd_loss="none")) is None
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10, dropout=0.0, drop_connect=0.0))
    subnets = sample_sandwich(net.space, ArchSampler(net.space, 0), 3)
    assert [s.role for s in subnets] == ["teacher", "student", "student"]

    class Engine:  # the engine interface over the plain module
        def __call__(self, x):
            return net(x)

        def set_gradient_accumulation_boundary(self, flag):
            pass

        def backward(self, loss):
            loss.backward()

    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    label_loss = build_label_loss(LossConfig())
    metrics = SandwichStep(label_loss, None)(Engine(), net, subnets, images, labels)
    assert not any(k.startswith("kd_div/") for k in metrics)
    for subnet in subnets[1:]:
        net.set_arch(subnet.arch)
        expected = label_loss(
            net(torch.nn.functional.interpolate(images, size=subnet.arch.resolution, mode="bicubic")), labels
        )
        assert metrics[f"loss/{subnet.name}"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_accumulates_in_fp32_and_needs_zero_1():
    config = build_ds_config(
        EngineConfig(precision="bf16", zero_stage=1), OptimizerConfig(), micro_batch=4, world_size=2
    )
    assert config["data_types"]["grad_accum_dtype"] == "fp32" and config["communication_data_type"] == "fp32"
    for stage in (0, 2, 3):
        with pytest.raises(ValueError, match="zero_stage 1"):
            EngineConfig(precision="bf16", zero_stage=stage)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_cpu_run_leaves_no_shared_memory_behind(tmp_path, ranks):
    """DeepSpeed's CPU all-reduce maps a 66 MB segment per rank in /dev/shm when the launcher sets LOCAL_SIZE,
    and never removes it; the process group is started so that each rank removes its name once every peer
    has mapped it, and the collectives still work.  One rank too: ``deepspeed --num_gpus 1`` on a CPU left
    its segment behind."""

    port = free_port()
    env = child_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LOCAL_SIZE=str(ranks))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    command += ["--master_port", str(port)]
    command += ["tests/workers/shm_release.py", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    for report in reports:
        assert report["shm_op_loaded"]  # else DeepSpeed made no segment and this test would prove nothing
        assert not report["own_buffer_listed"]
        assert report["sum"] == sum(range(1, ranks + 1))
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.parametrize("contiguous", [False, True])
def test_zero_1_accumulates_in_grad_without_per_parameter_hooks_unless_asked(single_rank, contiguous):
    """``engine.contiguous_gradients`` off (the default): DeepSpeed's ZeRO-1 installs no hook on any parameter,
    so the N backward passes of a step accumulate in ``.grad`` as in plain PyTorch; on, it hooks every
    parameter. The setting reaches ZeRO-2's optimizer too; ZeRO-3 keeps DeepSpeed's."""
    from models import ModelConfig, build_supernet
    from trainer.runtime.engine import build_engine

    init_distributed(resolve(), 60.0)  # the session's one in-process group (DeepSpeed cannot make a second)
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10))
    tc = EngineConfig(zero_stage=1, contiguous_gradients=contiguous)
    built = build_engine(net, tc, OptimizerConfig(), micro_batch=2, world_size=1, lr=0.1)
    zero = built.engine.optimizer
    assert zero.contiguous_gradients is contiguous
    trainable = sum(p.requires_grad for p in net.parameters())
    assert len(zero._grad_acc_hooks) == (trainable if contiguous else 0)
    for stage in (2, 3):
        ds_config = build_ds_config(EngineConfig(zero_stage=stage), OptimizerConfig(), micro_batch=2, world_size=1)
        zero_config = ds_config["zero_optimization"]
        assert zero_config.get("contiguous_gradients", "default") == (False if stage == 2 else "default")


@pytest.mark.parametrize("coalesce", [True, False])
def test_zero_2_reduces_a_step_once_when_coalescing(single_rank, monkeypatch, coalesce):
    """``trainer.runtime.engine.one_reduction`` around a step's 4 backward passes: ZeRO-2 reduces its gradient bucket
    once, at the block's end (``engine.coalesce_grad_reduction``, the default), instead of after every backward
    pass; the optimizer step then applies (the engine is at its accumulation boundary)."""
    from losses import LossConfig, build_kd_loss, build_label_loss
    from models import ArchSampler, ModelConfig, build_supernet
    from trainer.runtime.engine import build_engine, one_reduction
    from trainer.samplers import sample_sandwich
    from trainer.tasks.sandwich import SandwichStep

    init_distributed(resolve(), 60.0)  # the session's one in-process group (DeepSpeed cannot make a second)
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10))
    tc = EngineConfig(zero_stage=2, coalesce_grad_reduction=coalesce)
    built = build_engine(net, tc, OptimizerConfig(), micro_batch=4, world_size=1, lr=0.1)
    engine, zero = built.engine, built.engine.optimizer
    reductions = []
    original = zero.reduce_ipg_grads
    monkeypatch.setattr(zero, "reduce_ipg_grads", lambda *a, **k: reductions.append(1) or original(*a, **k))
    subnets = sample_sandwich(net.space, ArchSampler(net.space, seed=0), 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    engine.train()
    with one_reduction(engine, tc):
        SandwichStep(build_label_loss(LossConfig()), build_kd_loss(LossConfig()))(
            engine, net, subnets, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        )
    engine.step()
    assert len(reductions) == (1 if coalesce else 4)
    assert sum(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.endswith("weight")) > 10


def test_zero_3_marks_the_network_or_its_blocks_as_leaf_modules():
    from deepspeed.utils import z3_leaf_module

    from models import ModelConfig, build_supernet
    from trainer.runtime.engine import mark_zero3_leaves

    whole = build_supernet(ModelConfig(search_space="tiny", num_classes=10))
    assert mark_zero3_leaves(whole, "network") == [type(whole)]
    mark_zero3_leaves(whole, "network")  # a second engine on the same network adds no second input hook
    assert [m for m in whole.modules() if z3_leaf_module(m)] == [whole]
    assert len(whole._forward_pre_hooks) == 1
    blocks = build_supernet(ModelConfig(search_space="tiny", num_classes=10))
    assert mark_zero3_leaves(blocks, "block") == list(blocks.zero3_leaf_types)
    assert [m for m in blocks.modules() if z3_leaf_module(m)] == list(blocks.blocks)
    assert not blocks._forward_pre_hooks


def test_a_zero_3_network_leaf_sees_an_input_that_requires_a_gradient_only_while_recording():
    """DeepSpeed reduces a leaf's gradients from its full backward hook, which fires when the gradient of the leaf's
    input is computed: for the whole network that is the images, which need one (the update equivalence test fails
    with "Cannot reduce scatter" without it)."""
    from trainer.runtime.engine import _input_requires_grad

    images = torch.randn(2, 3, 8, 8)
    (given, flag) = _input_requires_grad(nn.Identity(), (images, True))
    assert given.requires_grad and given.is_leaf and torch.equal(given, images) and flag is True
    assert not images.requires_grad  # the caller's tensor is left as it was
    with torch.no_grad():
        assert _input_requires_grad(nn.Identity(), (images,)) is None
    assert _input_requires_grad(nn.Identity(), (images.requires_grad_(),)) is None
    assert _input_requires_grad(nn.Identity(), (torch.zeros(2, dtype=torch.long),)) is None
    assert _input_requires_grad(nn.Identity(), ()) is None


def test_zero3_gather_is_network_or_block():
    assert EngineConfig().zero3_gather == "network"
    from typedconfig import ConfigError, from_mapping

    assert from_mapping(EngineConfig, {"zero3_gather": "block"}).zero3_gather == "block"
    with pytest.raises(ConfigError, match="zero3_gather"):
        from_mapping(EngineConfig, {"zero3_gather": "layer"})


@pytest.mark.parametrize("clean", [False, True])
def test_the_inplace_teachers_targets_are_clean_only_when_asked(clean):
    """``task.teacher.clean_logits``: the students' target is a second forward of the largest sub-network with
    dropout and drop-connect off, after its label step; else the logits of its regularised forward."""
    from losses import LossConfig, build_kd_loss, build_label_loss
    from models import ArchSampler, ModelConfig, build_supernet
    from trainer.samplers import sample_sandwich
    from trainer.tasks.sandwich import SandwichStep
    from trainer.teachers.inplace import InplaceConfig, InplaceTeacher

    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10, dropout=0.5, drop_connect=0.5))
    subnets = sample_sandwich(net.space, ArchSampler(net.space, 0), 2)
    seen = []

    class Engine:
        def __call__(self, x):
            seen.append((net.regularize, torch.is_grad_enabled()))
            logits = net(x)
            outputs.append(logits.detach().clone())
            return logits

        def set_gradient_accumulation_boundary(self, flag):
            pass

        def backward(self, loss):
            loss.backward()

    outputs: list[torch.Tensor] = []
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    label_loss, kd_loss = build_label_loss(LossConfig()), build_kd_loss(LossConfig(kd_loss="kl"))
    teacher = InplaceTeacher.of(label_loss, kd_loss)
    teacher.config = InplaceConfig(clean_logits=clean)
    targets = []
    real = teacher.student_loss
    teacher.student_loss = lambda name, logits, target, labels, metrics: (
        targets.append(target) or real(name, logits, target, labels, metrics)
    )
    SandwichStep(label_loss, teacher=teacher)(Engine(), net, subnets, images, labels)
    net.train()
    if clean:
        assert seen[:2] == [(True, True), (False, False)]  # the label step, then the clean one without gradient
        assert torch.equal(targets[0], outputs[1])
        assert not torch.allclose(outputs[0], outputs[1])  # dropout and drop-connect changed the label step's
        net.set_arch(subnets[0].arch, regularize=False)
        with torch.no_grad():
            assert torch.allclose(targets[0], net(images), atol=1e-6)  # deterministic without regularisation
    else:
        assert seen[0] == (True, True) and len(seen) == 2
        assert torch.equal(targets[0], outputs[0])


def test_a_machine_without_an_accelerator_tells_deepspeed_so_unless_the_user_did(monkeypatch):
    """Else DeepSpeed's probe warns in every rank that it fell back to the CPU."""
    from trainer.runtime import accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator.default_to_cpu() and os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the user's choice stands
    assert not accelerator.default_to_cpu() and os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not accelerator.default_to_cpu() and "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accelerator, "find_spec", lambda name: object() if name == "torch_npu" else None)
    assert not accelerator.default_to_cpu() and "DS_ACCELERATOR" not in os.environ


def test_the_entry_point_prints_no_accelerator_probe_warning(tmp_path):
    command = [sys.executable, str(REPO / "trainer/run.py"), "--config", str(REPO / "configs/tiny_cpu.yaml")]
    env = {k: v for k, v in child_env().items() if k != "DS_ACCELERATOR"}
    printed = subprocess.run([*command, "--print-config"], env=env, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and "Setting accelerator to CPU" not in printed.stderr, printed.stderr[-2000:]
