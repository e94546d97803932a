"""Hostile and unlucky inputs: each case fails clearly (a ConfigError / exit code 2), never with a
traceback, a hang or memory exhaustion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from models import load_search_space
from trainer.config import load_config
from typedconfig import ConfigError, apply_overrides
from typedconfig.core import MAX_YAML_BYTES


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def billion_laughs() -> str:
    """1.4 KB of YAML whose aliases expand to 10^9 strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        refs = ",".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append("seed: *a8")  # before the limit, the error message repr()ed all 10^9 strings
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly(tmp_path, repo):
    path = write(tmp_path, billion_laughs())
    assert path.stat().st_size < 2000
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than") as err:
        load_config(path)
    assert time.perf_counter() - start < 5
    assert str(path) in str(err.value) and len(str(err.value)) < 1000
    out = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", str(path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "expands to more than" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "text, key",
    [
        ("trainer:\n  lr_per_256: .nan\n", "optimizer.lr_per_256"),
        ("trainer:\n  momentum: .inf\n", "optimizer.momentum"),
        ("loss:\n  temperature: -.inf\n", "loss.temperature"),
        ("data:\n  std: [0.2, .nan, 0.2]\n", "data.std[1]"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="finite") as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_non_finite_override_is_refused(repo):
    with pytest.raises(ConfigError, match="finite"):
        load_config(repo / "configs/tiny_cpu.yaml", ["optimizer.lr_per_256=.nan"])


@pytest.mark.parametrize(
    "text", ["trainer:\n  epochs: 3\n  epochs: 4\n", "trainer: {}\ntrainer:\n  epochs: 4\n", "a: {x: 1, x: 2}\n"]
)
def test_duplicate_keys_are_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(write(tmp_path, text))


def test_duplicate_keys_in_an_override_are_refused():
    with pytest.raises(ConfigError, match="duplicate key"):
        apply_overrides({}, ["data.std={a: 1, a: 2}"])


def test_huge_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(100 * 2**20)  # sparse: 100 MB that cost no disk
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"limited to {MAX_YAML_BYTES} bytes"):
        load_config(path)
    assert time.perf_counter() - start < 1


def test_error_messages_stay_short_for_huge_values(tmp_path):
    path = write(tmp_path, "model:\n  num_classes: [" + ", ".join(["1"] * 50_000) + "]\n")
    with pytest.raises(ConfigError, match="expected an integer") as err:
        load_config(path)
    assert len(str(err.value)) < 600


def test_a_few_aliases_still_work(tmp_path):
    path = write(tmp_path, "data:\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n")
    assert load_config(path).data.std == (0.5, 0.5, 0.5)


def run_entry_point(repo: Path, run_dir: Path, sets: list[str]) -> subprocess.CompletedProcess:
    """``trainer/run.py`` of the tiny recipe as one plain process (no launcher's rank variables), output kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [sys.executable, "trainer/run.py", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(run_dir)]
    return subprocess.run(
        [*command, "--set", *sets],
        cwd=repo,
        env={**env, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("seed=-1", "seed must be >= 0"),
        ("optimizer.momentum=1.5", "optimizer.momentum must be in [0, 1)"),
        ("data.std=[0.2, 0, 0.2]", "data.std must be > 0"),
        ("search.population=0", None),  # not a run key: refused as unknown
    ],
)
def test_out_of_range_values_exit_2_naming_the_key(repo, override, fragment):
    out = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", "configs/tiny_cpu.yaml", "--set", override],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (fragment or "unknown key") in out.stderr


def test_a_cut_or_foreign_metrics_line_is_dropped_on_resume(tmp_path):
    from trainer.runtime.metrics import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n[1, 2]\n{"step": 3, "lo')
    truncate_jsonl(path, after_step=2)  # raised JSONDecodeError on the cut line before
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_unreadable_candidate_records_are_evaluated_again(tmp_path):
    from search.candidates import CANDIDATES, CandidateStore, read_candidates
    from search.evolution import Candidate

    good = Candidate(load_search_space("tiny").smallest(), 0.5, 0.1, 50.0, 90.0).to_record()
    (tmp_path / CANDIDATES).write_text("{}\n" + json.dumps({"arch": {"widths": 3}}) + "\n" + json.dumps(good) + "\n")
    assert list(read_candidates(tmp_path).values()) == [good]  # KeyError on {} before
    # A file holding only a cut line is rewritten, so the next record does not glue onto it.
    (tmp_path / CANDIDATES).write_text('{"arch": {"resolu')
    store = CandidateStore(tmp_path, rank=0, world_size=1)
    assert len(store) == 0 and (tmp_path / CANDIDATES).read_text() == ""


@pytest.mark.parametrize("output", ["../../x", "/tmp/x", "a/b", "..", ""])
def test_search_output_stays_inside_the_run_folder(output):
    from search.config import SearchConfig

    with pytest.raises(ValueError, match=r"search\.output"):
        SearchConfig(output=output)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../x.tar", None])
def test_manifest_names_cannot_leave_the_data_folder(tmp_path, name):
    from data_pipeline import DataError
    from data_pipeline.manifest import ffcv_entry, webdataset_shards

    shard = {"name": name, "size": 1, "sha256": "0", "count": 1}
    manifest = {"version": 1, "splits": {"train": {"count": 1, "webdataset": {"shards": [shard]}, "ffcv": shard}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="must be named inside"):
        webdataset_shards(tmp_path, "train")
    with pytest.raises(DataError, match="must be named inside"):
        ffcv_entry(tmp_path, "train")


def test_a_corrupt_manifest_is_a_data_error(tmp_path):
    from data_pipeline import DataError
    from data_pipeline.manifest import read_manifest

    (tmp_path / "manifest.json").write_text('{"version": 1, "spl')
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.batch_size=100000", "fewer than one batch of 100000 (data.batch_size is per rank)"),
        ("model.num_classes=5", "has 10 classes but model.num_classes is 5"),
    ],
)
def test_data_that_cannot_train_exits_2_before_the_first_step(repo, digits_shards, tmp_path, override, fragment):
    out = run_entry_point(repo, tmp_path / "run", [f"data.root={digits_shards}", "data.num_workers=0", override])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert fragment in out.stderr


def test_a_busy_rendezvous_port_is_one_line_naming_the_launcher_option(repo, digits_shards, tmp_path):
    import socket

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with socket.socket() as busy:  # another run's rendezvous
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "trainer/run.py", "--config", "configs/tiny_cpu.yaml", "--run-dir", str(tmp_path)]
        out = subprocess.run(
            [*command, "--set", f"data.root={digits_shards}", "data.num_workers=0"],
            cwd=repo,
            env={**env, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"error: port {port} on 127.0.0.1 is in use" in out.stderr and "--master_port" in out.stderr


def test_an_exported_arch_must_match_its_weights(tmp_path, tiny_space):
    import yaml

    from models import load_subnet, save_subnet
    from models.mbconv.static import StaticSubnet

    folder = save_subnet(StaticSubnet(tiny_space, tiny_space.smallest(), num_classes=10), tmp_path / "export")
    assert load_subnet(folder).arch == tiny_space.smallest()  # the honest export loads
    honest = yaml.safe_load((folder / "arch.yaml").read_text())

    def edited(change) -> str:
        description = yaml.safe_load(yaml.safe_dump(honest))
        change(description)
        (folder / "arch.yaml").write_text(yaml.safe_dump(description))
        with pytest.raises(ConfigError) as info:
            load_subnet(folder)
        return str(info.value)

    def huge_space(d):  # widths a crafted file could ask for: refused before anything is allocated
        d["search_space"]["stages"][0]["widths"] = [10**9]
        d["arch"]["widths"][1] = 10**9

    assert "parameters but" in edited(huge_space)
    assert "num_classes" in edited(lambda d: d.update(num_classes=10**9))
    assert "arch outside its search space" in edited(lambda d: d["arch"].update(resolution=10**6))
    assert "parameters but" in edited(lambda d: d.update(num_classes=11))

    def huge_resolution(d):  # no weight holds the resolution: before, a training step asked for 103 GB
        d["search_space"]["resolutions"] = [16, 24, 32, 16384]
        d["arch"]["resolution"] = 16384

    message = edited(huge_resolution)
    assert "resolutions [16384] outside 1..1024" in message and str(folder / "arch.yaml") in message
    (folder / "arch.yaml").write_text(billion_laughs())
    with pytest.raises(ConfigError):
        load_subnet(folder)


def test_an_export_whose_tensors_differ_in_shape_or_are_not_safetensors_is_one_line(tmp_path, tiny_space):
    """The same number of parameters in other shapes (before: "size mismatch for blocks.0.dw_conv.weight" from
    load_state_dict), and a model.safetensors that is no safetensors file (before: "SafetensorError: header too
    large"): a ConfigError naming the file and the tensor."""
    from safetensors.torch import load_file, save_file

    from models import load_subnet, save_subnet
    from models.mbconv.static import StaticSubnet

    folder = save_subnet(StaticSubnet(tiny_space, tiny_space.smallest(), num_classes=10), tmp_path / "export")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.dim() == 4 and v.shape[-1] == 3)
    state[key] = state[key].reshape(*state[key].shape[:2], 9, 1)  # same count, another shape
    save_file(state, str(weights))
    with pytest.raises(ConfigError) as info:
        load_subnet(folder)
    message = str(info.value)
    assert "\n" not in message and str(weights) in message and f"first {key}: [" in message, message
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="is not a readable safetensors file") as info:
        load_subnet(folder)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def test_torchvision_weights_are_checked_against_a_meta_model_before_any_allocation(tmp_path):
    """``vit_h_14`` named beside resnet18 weights: refused from the safetensors header and the model built on
    the meta device (before: 3.2 GiB allocated, then "does not fit"); a non-safetensors file is one line."""
    import resource

    import torchvision
    from safetensors.torch import save_file

    from trainer.tasks.one_network.networks import torchvision_model

    weights = tmp_path / "w.safetensors"
    save_file(torchvision.models.get_model("resnet18", weights=None, num_classes=10).state_dict(), str(weights))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=r"does not fit torchvision vit_h_14: .*first") as info:
        torchvision_model("vit_h_14", 1, weights)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300 * 1024  # KiB; vit_h_14 is 2.5 GB
    assert torchvision_model("resnet18", 1, weights).fc.out_features == 10
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        torchvision_model("resnet18", 1, weights)


def test_more_outputs_than_classes_is_a_warning_printed_at_start(repo, digits_shards):
    from trainer.config import load_config
    from trainer.runtime.data import build_run_data

    sets = [f"data.root={digits_shards}", "data.verify=never", "data.num_workers=0"]
    config = load_config(repo / "configs/tiny_cpu.yaml", [*sets, "model.num_classes=12"])
    notes = build_run_data(config, rank=0, world=1, local_rank=0).notes
    assert notes == [
        f"warning: {digits_shards} has 10 classes but model.num_classes is 12; the extra outputs are never a "
        "label (--set model.num_classes=10 unless that is meant)"
    ]
    assert build_run_data(load_config(repo / "configs/tiny_cpu.yaml", sets), rank=0, world=1, local_rank=0).notes == []


def test_a_batch_size_change_accepted_on_resume_is_one_line_naming_the_file(repo, digits_shards, tmp_path, single_rank):
    """``--allow-config-change data.batch_size=8`` over a run saved at 16: before, "ValueError: loader state was
    saved with batch_size=16" escaped as a traceback; now a CheckpointError (exit 2 from trainer/run.py) naming
    the rank's state file, the key and what to do."""
    from trainer_helpers import overrides, run_in_process

    from trainer.state.checkpoint import CheckpointError

    run = tmp_path / "run"
    run_in_process(repo, overrides(run, digits_shards, **{"optimizer.max_steps": 2}))
    changed = overrides(run, digits_shards, **{"optimizer.max_steps": 4, "data.batch_size": 8})
    with pytest.raises(CheckpointError) as info:
        run_in_process(repo, changed, allow_config_change=True)
    message = str(info.value)
    assert str(run / "checkpoints" / "step000000002" / "trainer_rank0.pt") in message and "\n" not in message
    assert "data.batch_size 16, this run has 8; resume with the checkpoint's value" in message


@pytest.mark.parametrize("case", ["not_safetensors", "vit_h_14_beside_resnet18"])
def test_a_crafted_export_stops_the_trainer_in_one_line(repo, digits_shards, tmp_path, case):
    """The entry point's side of the export checks above: exit 2, the file named, no traceback."""
    import torchvision
    from safetensors.torch import save_file

    from models import save_subnet
    from models.mbconv.static import StaticSubnet

    folder = tmp_path / "export"
    if case == "not_safetensors":
        space = load_search_space("tiny")
        save_subnet(StaticSubnet(space, space.smallest(), num_classes=10), folder)
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
        fragment = "is not a readable safetensors file"
    else:
        folder.mkdir()
        (folder / "torchvision.yaml").write_text("torchvision: vit_h_14\nnum_classes: 10\n")
        resnet18 = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
        save_file(resnet18.state_dict(), str(folder / "model.safetensors"))
        fragment = "does not fit torchvision vit_h_14"
    sets = [
        f"data.root={digits_shards}",
        "data.num_workers=0",
        "task.name=one_network",
        f"task.student.export={folder}",
    ]
    out = run_entry_point(repo, tmp_path / "run", sets)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert fragment in line and str(folder / "model.safetensors") in line
