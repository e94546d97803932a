"""The optional loggers: W&B (offline mode: its run files, read back) and MLflow (its SQLite store in the run folder,
read back with MlflowClient) receive a training run's metrics at their steps and the config, and a resume
continues the same run; a backend turned on without its package stops the run at once, naming the extra."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from trainer_helpers import overrides, run_in_process

from trainer.config import load_config
from trainer.runtime import sinks
from trainer.runtime.metrics import MetricsLogger
from typedconfig import ConfigError


@pytest.fixture(scope="module")
def digits(digits_shards) -> Path:
    return digits_shards


def jsonl_values(run: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` in RUN/metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


# ---- a missing package -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "module"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "alembic")])
def test_a_backend_without_its_package_stops_the_entry_point_in_one_line(repo, monkeypatch, capsys, backend, module):
    import faulthandler
    from importlib.util import find_spec

    from trainer.run import main

    monkeypatch.setattr(faulthandler, "enable", lambda **_: None)  # pytest's own stays as it is
    monkeypatch.setattr(sinks, "find_spec", lambda name: None if name == module else find_spec(name))
    with pytest.raises(SystemExit) as exit_:  # as a config error: before anything heavy is imported
        main(["--config", str(repo / "configs/tiny_cpu.yaml"), "--set", f"log.{backend}.enabled=true"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert f"log.{backend}.enabled" in err and f"pip install 'alphanet-train[{backend}]'" in err and module in err


def test_the_trainer_checks_the_packages_before_it_builds_anything(repo, tmp_path, monkeypatch):
    from trainer.loop import Trainer

    monkeypatch.setattr(sinks, "find_spec", lambda name: None)
    config = load_config(repo / "configs/tiny_cpu.yaml", [f"run_dir={tmp_path / 'run'}", "log.wandb.enabled=true"])
    with pytest.raises(ConfigError, match=r"alphanet-train\[wandb\]"):
        Trainer(config)
    assert not (tmp_path / "run").exists()  # not even the run folder's lock


def test_the_logger_gives_its_sinks_the_numbers_of_each_record_and_closes_them(tmp_path):
    class Kept:
        def __init__(self):
            self.records, self.closed = [], False

        def log(self, step, values):
            self.records.append((step, values))

        def close(self, *, failed=False):
            self.closed = "failed" if failed else True

    sink, other_rank = Kept(), Kept()
    log = MetricsLogger(tmp_path, enabled=True, total_steps=10, start_step=0, sinks=[sink])
    log.log_record({"step": 3, "epoch": 0, "loss/largest": 1.5, "note": "text"})
    log.close(failed=True)
    MetricsLogger(tmp_path / "other", enabled=False, total_steps=10, start_step=0, sinks=[other_rank]).close()
    assert sink.records == [(3, {"loss/largest": 1.5})] and sink.closed == "failed"
    assert other_rank.records == [] and not other_rank.closed


def test_tensorboard_sink_writes_scalars_at_their_steps_and_hides_those_after_a_resume_point(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.runtime.sinks.tensorboard_sink import TensorBoardSink

    first = TensorBoardSink(tmp_path, start_step=0)
    for step in (1, 2, 3):
        first.log(step, {"loss/largest": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, start_step=1)  # a resume from step 1: steps 2 and 3 are written again
    resumed.log(2, {"loss/largest": 20.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/largest")] == [(1, 1.0), (2, 20.0)]


# ---- Weights & Biases: reading its run files -------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header, then LevelDB's log format (32 KiB blocks
    of chunks, each with a 7-byte header: CRC, length, type full/first/middle/last) around protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7]) if left >= 7 else (0, 0)
        if length == 0 and kind == 0:  # a block's padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> tuple[str, dict[int, dict[str, float]], dict[str, str]]:
    """(run id, {step: {key: value}} of the history, {config key: JSON value}) of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    run_id, history, config = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, history, config


# ---- both, on one training run and its resume ------------------------------------------------------------------
@pytest.mark.slow
def test_wandb_and_mlflow_hold_the_metrics_and_a_resume_continues_their_runs(
    repo, digits, tmp_path, single_rank, monkeypatch
):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a test
    monkeypatch.setenv("WANDB_MODE", "offline")  # log.wandb.mode null: W&B's variable decides
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's files go to the run folder
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    on = {"log.wandb.enabled": True, "log.wandb.project": "tests", "log.mlflow.enabled": True}
    on["log.mlflow.experiment"] = "tests"
    run_in_process(repo, overrides(run, digits, **on, **{"optimizer.max_steps": 2}))

    # W&B, offline: a run folder under RUN/wandb/ named by the id kept in RUN/wandb_run_id.
    wandb_id = (run / "wandb_run_id").read_text().strip()
    (first_folder,) = (run / "wandb").glob(f"offline-run-*-{wandb_id}")
    first_id, history, config = wandb_run(first_folder)
    assert first_id == wandb_id and sorted(history) == [1, 2]
    for key in ("lr", "loss/largest", "val/top1_largest"):
        assert {step: row[key] for step, row in history.items() if key in row} == pytest.approx(jsonl_values(run, key))
    assert json.loads(config["optimizer"])["max_steps"] == 2  # the resolved config, as nested values
    # MLflow: its SQLite store in the run folder, the run's id in RUN/mlflow_run_id, the config as parameters.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    mlflow_id = (run / "mlflow_run_id").read_text().strip()
    started = client.get_run(mlflow_id)
    assert started.info.status == "FINISHED" and started.info.run_name == "run"
    assert started.data.params["optimizer.max_steps"] == "2" and started.data.params["model.search_space"] == "tiny"

    # The same command, longer: resumed from the checkpoint of step 2, the same runs go on at step 3.
    trainer, _ = run_in_process(repo, overrides(run, digits, **on, **{"optimizer.max_steps": 4}))
    assert trainer.resumed_from == "step000000002"

    assert (run / "wandb_run_id").read_text().strip() == wandb_id
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and folders[0] == first_folder
    second_id, history, config = wandb_run(folders[1])
    assert second_id == wandb_id and sorted(history) == [3, 4]
    assert history[4]["lr"] == pytest.approx(jsonl_values(run, "lr")[4])
    assert json.loads(config["optimizer"])["max_steps"] == 4  # a change a resume may make, updated

    assert (run / "mlflow_run_id").read_text().strip() == mlflow_id
    (experiment,) = [e for e in client.search_experiments() if e.name == "tests"]
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == mlflow_id and only.info.status == "FINISHED"
    for key in ("lr", "loss/largest"):
        logged = {m.step: m.value for m in client.get_metric_history(mlflow_id, key)}
        assert logged == pytest.approx(jsonl_values(run, key)) and sorted(logged) == [1, 2, 3, 4]
    validation = client.get_metric_history(mlflow_id, "val/top1_largest")
    assert [m.step for m in validation] == [2, 4]  # the end of each invocation validates
    assert only.data.params["optimizer.max_steps"] == "2"  # parameters keep their first value


def test_a_failed_run_is_marked_failed_in_both(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from trainer.runtime.sinks.mlflow_sink import MlflowSink
    from trainer.runtime.sinks.wandb_sink import WandbSink
    from trainer.sections import MlflowConfig, WandbConfig

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run.mkdir()
    built = [
        WandbSink(WandbConfig(enabled=True, mode="offline"), run, run_config={"seed": 0}),
        MlflowSink(MlflowConfig(enabled=True), run, run_config={"seed": 0}),
    ]
    for sink in built:
        sink.log(1, {"loss/largest": 2.0})
        sink.close(failed=True)
    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_run((run / "mlflow_run_id").read_text().strip()).info.status == "FAILED"
