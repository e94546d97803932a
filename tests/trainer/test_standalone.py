"""Standalone training (issue 13 §2–§3): one network, a fixed teacher, fine-tuning and transfer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from trainer_helpers import overrides, run_in_process

from models import load_subnet
from typedconfig import ConfigError

DISTILL = "configs/tiny_distill_cpu.yaml"
FINETUNE = "configs/tiny_finetune_cpu.yaml"


def student_losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/student" in r}


def test_a_network_source_is_exactly_one_form():
    from trainer.tasks.one_network.config import NetworkSource

    assert NetworkSource(run=Path("r"), arch="largest").describe() == "largest of run r"
    for bad in (
        {},
        {"export": Path("e"), "torchvision": "resnet18"},
        {"run": Path("r")},
        {"export": Path("e"), "arch": "largest"},
        {"arch": "smallest", "weights": Path("w.pth")},
    ):
        with pytest.raises(ValueError):
            NetworkSource(**bad)


def test_config_errors_name_the_key(repo, tmp_path):
    from trainer.config import load_config

    with pytest.raises(ConfigError, match=r"task\.teacher"):
        load_config(repo / DISTILL, ["loss.kd_loss=none"])
    with pytest.raises(ConfigError, match=r"task\.teacher_logits"):
        load_config(repo / DISTILL, ["task.teacher=null"])
    with pytest.raises(ConfigError, match=r"task\.student"):
        load_config(repo / DISTILL, ["task.student.torchvision=resnet18"])
    # The sandwich task's KD levers do not apply to a distilled network (task.label_weight does that) ...
    with pytest.raises(ConfigError, match=r"loss\.kd_label_mix.*task\.label_weight"):
        load_config(repo / DISTILL, ["loss.kd_label_mix=0.5"])
    # ... and are ignored without a teacher, so a sandwich recipe with levers trains a network alone unchanged.
    load_config(
        repo / "configs/tiny_cpu.yaml",
        ["task.name=one_network", "task.student.arch=largest", "loss.kd_gate=teacher_correct"],
    )


def test_torchvision_weights_load_from_disk_and_the_classifier_can_be_replaced(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    from trainer.tasks.one_network.networks import last_linear, replace_classifier, torchvision_model

    torch.manual_seed(0)
    original = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=12).eval()
    state = original.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    for name in ("w.pth", "w.safetensors"):
        model = torchvision_model("mobilenet_v3_small", 1000, tmp_path / name).eval()  # the file's 12 classes win
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        torchvision_model("mobilenet_v3_small", 1000, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="unknown torchvision"):
        torchvision_model("no_such_net", 10, None)

    model = torchvision_model("mobilenet_v3_small", 1000, tmp_path / "w.pth")
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.3")}
    replace_classifier(model, 3)
    assert last_linear(model)[0] == "classifier.3" and model.eval()(x).shape == (2, 3)
    for key, value in body.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_fixed_teacher_chain_trains_caches_resumes_and_reloads(repo, digits_shards, tmp_path, single_rank):
    """A labels-only tiny_l run, then tiny_s distilled from its final export with cached logits; the student run
    resumes bit-identically and its final export reloads with the accuracy it reported."""
    from data_pipeline import build_loader
    from data_pipeline.device_transforms import normalize
    from trainer.runtime.evaluate import accuracy_counts

    teacher_run = tmp_path / "teacher"
    teacher_args = {
        "task.student.arch": "configs/tiny_models.yaml:tiny_l",
        "task.teacher": "null",
        "task.teacher_logits": "on_the_fly",
        "optimizer.epochs": 1,
        "optimizer.max_steps": 30,
        "optimizer.warmup_epochs": 0,
        "checkpoint.every_steps": 100,
    }
    _, results = run_in_process(repo, overrides(teacher_run, digits_shards, **teacher_args), recipe=DISTILL)
    teacher_top1 = results["val"]["student"]["top1"]
    assert set(student_losses(teacher_run)[1]) == {"loss/label", "loss/student"}

    final = load_subnet(teacher_run / "final")  # the export a later run (or the search's tools) can load
    assert final.arch.resolution == 32 and final.num_classes == 10
    preprocessing = yaml.safe_load((teacher_run / "final" / "arch.yaml").read_text())["preprocessing"]
    assert preprocessing["input_size"] == [3, 32, 32] and preprocessing["interpolation"] == "bicubic"
    from trainer.config import load_config

    data = load_config(repo / DISTILL, [f"data.root={digits_shards}", "data.num_workers=0"]).data
    counts = accuracy_counts(final, build_loader(data, "val", train=False), 32, data.mean, data.std, "cpu")
    assert 100 * counts[0] / counts[2] == pytest.approx(teacher_top1)

    student = {"task.teacher.run": "null", "task.teacher.arch": "null"}
    student["task.teacher.export"] = teacher_run / "final"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer, results = run_in_process(repo, overrides(straight, digits_shards, **student), recipe=DISTILL)
    assert results["global_step"] == 6 and 0 <= results["val"]["student"]["top1"] <= 100
    assert set(student_losses(straight)[1]) == {"loss/label", "loss/kd", "loss/student"}
    parts = list((straight / "teacher_logits").glob("*.safetensors"))
    assert len(parts) == 1

    # the cache holds the teacher's logits on the un-augmented training images, by sample index
    cache = trainer.task.teacher.cache
    batch = next(iter(build_loader(data, "train", train=False)))
    direct = final(normalize(batch.images, data.mean, data.std))
    torch.testing.assert_close(cache[batch.indices], direct, rtol=1e-5, atol=1e-5)

    from search import run as search

    assert search.main(["--config", str(repo / "configs/search_tiny_cpu.yaml"), "--run-dir", str(straight)]) == 2

    run_in_process(repo, overrides(resumed, digits_shards, **{**student, "optimizer.max_steps": 4}), recipe=DISTILL)
    trainer, _ = run_in_process(repo, overrides(resumed, digits_shards, **student), recipe=DISTILL)
    assert trainer.resumed_from == "step000000004"
    assert student_losses(resumed) == student_losses(straight)  # bit-identical continuation
    assert load_subnet(resumed / "final").arch == load_subnet(straight / "final").arch


def test_finetune_inherits_the_supernet_and_transfers_to_new_classes(repo, digits_shards, tmp_path, single_rank):
    """A short supernet run; its smallest sub-network fine-tuned with the inherited teacher (on the fly); then
    the fine-tuned export transferred to a 3-class dataset with a new classifier."""
    from data_helpers import make_image_folder
    from safetensors.torch import load_file

    from data_pipeline import prepare as prep
    from models import extract_subnet
    from trainer.consolidate import load_supernet
    from trainer.tasks.one_network import build_student_and_teacher

    supernet_run = tmp_path / "supernet"
    run_in_process(repo, overrides(supernet_run, digits_shards, **{"optimizer.max_steps": 2}))

    tune = {
        "task.student.export": "null",
        "task.student.run": supernet_run,
        "task.student.arch": "smallest",
        "task.teacher.run": supernet_run,
        "optimizer.max_steps": 3,
        "eval.every_epochs": 0,
    }
    from trainer.config import load_config

    config = load_config(repo / FINETUNE, overrides(tmp_path / "unused", digits_shards, **tune))
    student, teacher = build_student_and_teacher(config, rank=0, world=1, device=torch.device("cpu"))
    supernet = load_supernet(supernet_run, config.model, 0, "cpu")
    inherited = extract_subnet(supernet, supernet.space.smallest()).state_dict()
    for key, value in student.module.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BN statistics are recalibrated
            torch.testing.assert_close(value, inherited[key], rtol=0, atol=0)
    assert teacher.network.resolution == supernet.space.largest().resolution
    assert not any(p.requires_grad for p in teacher.module.parameters())

    tuned = tmp_path / "tuned"
    _, results = run_in_process(repo, overrides(tuned, digits_shards, **tune), recipe=FINETUNE)
    assert results["global_step"] == 3 and "loss/kd" in student_losses(tuned)[1]
    changed = load_file(str(tuned / "final" / "model.safetensors"))
    assert any(not torch.equal(changed[k], inherited[k]) for k in changed if k.endswith("weight"))

    folder = make_image_folder(tmp_path / "three", classes=3, per_class=24)
    three = tmp_path / "three_shards"
    prep.prepare(str(folder), three, ["webdataset"], quiet=True)
    transfer = {
        "data.root": three,
        "model.num_classes": 3,
        "model.dropout": 0.5,
        "task.student.export": tuned / "final",
        "task.student.run": "null",
        "task.student.arch": "null",
        "task.teacher": "null",
        "task.new_classifier": "true",
        "loss.kd_loss": "none",
        "optimizer.max_steps": 3,
    }
    moved = tmp_path / "transfer"
    args = overrides(moved, digits_shards, **transfer)
    _, results = run_in_process(repo, args, recipe=FINETUNE)
    assert results["val"]["student"]["samples"] == 24
    model = load_subnet(moved / "final")
    assert model.num_classes == 3 and model.classifier.out_features == 3
    body = {k: v for k, v in load_file(str(tuned / "final" / "model.safetensors")).items() if "classifier" not in k}
    assert body.keys() < model.state_dict().keys()

    with pytest.raises(ConfigError, match="new_classifier"):  # 10 outputs for a 3-class dataset, not replaced
        run_in_process(repo, [*args, "task.new_classifier=false", f"run_dir={tmp_path / 'x'}"], recipe=FINETUNE)


def test_a_run_teacher_stays_the_one_the_run_started_with(repo, digits_shards, tmp_path, single_rank):
    """A ``{run: ..., arch: ...}`` teacher is the source run's weights with BatchNorm recalibrated on
    ``eval.calib_batches`` batches; resumed with another (operational) value, or after the source run trained
    on, it is still the teacher the run started with (issue 37 item 4: 147 of 343 entries differed), which
    ``RUN/teacher`` keeps with what produced it."""
    supernet_run = tmp_path / "supernet"
    run_in_process(repo, overrides(supernet_run, digits_shards, **{"optimizer.max_steps": 2}))
    tune = {
        "task.student.export": "null",
        "task.student.arch": "smallest",
        "task.teacher.run": supernet_run,
        "optimizer.max_steps": 2,
        "eval.every_epochs": 0,
        "eval.calib_batches": 2,
    }
    run = tmp_path / "tuned"
    first, _ = run_in_process(repo, overrides(run, digits_shards, **tune), recipe=FINETUNE)
    started = {k: v.clone() for k, v in first.task.teacher.module.state_dict().items()}

    resumed = {**tune, "eval.calib_batches": 4, "optimizer.max_steps": 3}
    for step in (3, 4):
        if step == 4:
            run_in_process(repo, overrides(supernet_run, digits_shards, **{"optimizer.max_steps": 3}))  # trains on
        later, _ = run_in_process(
            repo, overrides(run, digits_shards, **{**resumed, "optimizer.max_steps": step}), recipe=FINETUNE
        )
        assert later.resumed_from == f"step00000000{step - 1}"
        now = later.task.teacher.module.state_dict()
        assert now.keys() == started.keys()
        assert [k for k, v in started.items() if not torch.equal(now[k], v)] == []
        assert any("as this run first built it" in note for note in later.notes)
    pinned = yaml.safe_load((run / "teacher" / "arch.yaml").read_text())["pinned_teacher"]
    assert pinned["calib_batches"] == 2 and pinned["checkpoint"] == "step000000002"

    fresh, _ = run_in_process(repo, overrides(tmp_path / "fresh", digits_shards, **resumed), recipe=FINETUNE)
    other = fresh.task.teacher.module.state_dict()
    assert any(not torch.equal(other[k], v) for k, v in started.items())  # what rebuilding it would have given


@pytest.mark.parametrize(
    "name", ["finetune_alphanet_imagenet", "transfer_alphanet", "distill_mobilenetv3_imagenet", "tiny_distill_cpu"]
)
def test_standalone_recipes_load(repo, name):
    from trainer.config import load_config

    config = load_config(repo / "configs" / f"{name}.yaml")
    assert config.task.name == "one_network"


def test_transfer_recipe_has_the_papers_settings(repo):
    from trainer.config import load_config

    config = load_config(repo / "configs" / "transfer_alphanet.yaml")
    tc = config.optimizer
    assert (tc.momentum, tc.epochs, config.loss.label_smoothing, config.model.dropout) == (0.9, 150, 0.1, 0.5)
    assert config.data.batch_size == 64 and config.task.new_classifier and config.task.teacher is None


def test_a_missing_export_says_how_to_make_one(tmp_path):
    from models import ModelConfig
    from trainer.tasks.one_network.config import NetworkSource
    from trainer.tasks.one_network.networks import load_network

    source = NetworkSource(export=tmp_path / "exports" / "tiny_m")
    with pytest.raises(ConfigError, match=r"does not exist: export a sub-network first.*make demo"):
        load_network(source, ModelConfig(), base_resolution=32, calibration=None, rank=0, device="cpu")


def test_the_teacher_cache_key_follows_the_teachers_weights():
    """A teacher file replaced at the same path has other weights, so another cache key (its config is equal)."""
    from trainer.tasks.one_network.distill import weights_fingerprint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    same = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    same.load_state_dict(net.state_dict())
    assert weights_fingerprint(net) == weights_fingerprint(same)  # num_batches_tracked (0-d int64) included
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0] += 1e-6
    assert weights_fingerprint(net) != weights_fingerprint(same)
    same.load_state_dict(net.state_dict())
    same[1].num_batches_tracked += 1
    assert weights_fingerprint(net) != weights_fingerprint(same)
