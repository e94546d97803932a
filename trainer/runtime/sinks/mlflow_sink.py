"""MLflow: the records as metrics of one MLflow run per run folder, continued on resume; the config as its
parameters."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fileops import atomic_write_text
from trainer.sections import MlflowConfig
from typedconfig import dotted_items

RUN_ID_FILE = "mlflow_run_id"
"""In the run folder: the MLflow run's id, written when the run is created and read by every resume."""
DATABASE = "mlflow.db"
"""The run folder's own MLflow store when ``log.mlflow.tracking_uri`` is null."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a parameter's value."""


class MlflowSink:
    def __init__(self, config: MlflowConfig, run_dir: Path, *, run_config: dict[str, Any]):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self._client = MlflowClient(tracking_uri=config.tracking_uri or f"sqlite:///{run_dir / DATABASE}")
        id_file = run_dir / RUN_ID_FILE
        run = None
        if id_file.is_file():
            try:
                run = self._client.get_run(id_file.read_text().strip())
            except MlflowException:  # not in this store (tracking_uri changed, store deleted): a new run
                run = None
        if run is None:
            experiment = self._client.get_experiment_by_name(config.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self._client.create_experiment(config.experiment)
            )
            run = self._client.create_run(experiment_id, run_name=config.run_name or run_dir.name)
            atomic_write_text(id_file, run.info.run_id + "\n")
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
        self._run_id = run.info.run_id
        # Parameters cannot change once logged: a resume adds the keys the run lacks; a changed value (allowed
        # with --allow-config-change) stays as first logged, and RUN/config_changes.jsonl records the change.
        params = {k: str(v)[:MAX_PARAM_CHARS] for k, v in dotted_items(run_config).items() if k not in run.data.params}
        self._log_params(params)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self._client.log_batch(self._run_id, params=items[start : start + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, *, failed: bool = False) -> None:
        self._client.set_terminated(self._run_id, status="FAILED" if failed else "FINISHED")
