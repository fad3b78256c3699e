"""MLflow lineage and the model registry: one run per fine-tune, one version per run.

Idempotency is by key, not by luck: every run and model version carries the tag
`tuneship.run_key` (the DAG run that made it), so a retried or re-run task finds and
reuses what the first attempt created instead of registering a second version.
Promotion moves aliases (`@challenger`, `@champion`), never stages. Each task has its own
registered model (`registered_model` in its task file): every call names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship import config

EXPERIMENT = "tuneship-finetune"
RUN_KEY = "tuneship.run_key"


def _mlflow():
    import mlflow

    configured = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(config.mlflow_tracking_uri())
    if configured is None:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI; left there, it would pin every later
        # lookup to this home's store even after TUNESHIP_HOME changes (tests, tools in one process)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return mlflow


def client():
    from mlflow import MlflowClient

    _mlflow()
    return MlflowClient(tracking_uri=config.mlflow_tracking_uri(), registry_uri=config.mlflow_tracking_uri())


def _experiment_id(name: str = EXPERIMENT) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=f"{config.mlflow_artifact_root()}/{name}")


def find_run(run_key: str) -> str | None:
    runs = client().search_runs(
        [_experiment_id()], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def start_run(run_key: str, *, run_name: str, tags: dict[str, str] | None = None) -> str:
    """The MLflow run for `run_key`, created once."""
    existing = find_run(run_key)
    if existing:
        return existing
    run = client().create_run(_experiment_id(), run_name=run_name, tags={RUN_KEY: run_key, **(tags or {})})
    return run.info.run_id


def log_training(run_id: str, *, params: dict[str, Any], train_out: Path, dataset: dict[str, str],
                 dataset_name: str) -> None:
    """Params, per-step metrics, system metrics, the dataset version as an input, the adapter and plots.

    System metrics are the trainer's samples (`metrics.json` `system`, see
    `tuneship.train.sysmetrics`), logged as `system/<name>` at their training step and sample
    time: MLflow's own naming, so the UI shows them under the run's System metrics.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Metric, Param

    c = client()
    run = c.get_run(run_id)
    already = set(run.data.params)
    c.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items() if k not in already])
    metrics = json.loads((train_out / "metrics.json").read_text())
    now = int(run.info.start_time or 0)
    batch = [Metric("train_loss", float(h["loss"]), now, int(h["step"])) for h in metrics.get("history", [])]
    for sample in metrics.get("system", []):
        ts, step = int(sample["timestamp"]), int(sample["step"])
        batch += [Metric(f"system/{k}", float(v), ts, step) for k, v in sample.items()
                  if k not in ("timestamp", "step") and isinstance(v, int | float)]
    for key in ("train_loss", "eval_loss", "tokens_per_s", "wall_s"):
        if metrics.get(key) is not None:
            batch.append(Metric(f"final_{key}", float(metrics[key]), now, 0))
    for i in range(0, len(batch), 900):
        c.log_batch(run_id, metrics=batch[i:i + 900])
    if not run.inputs or not run.inputs.dataset_inputs:
        source = resolve_dataset_source(dataset["path"])
        ds = MetaDataset(source=source, name=dataset_name, digest=dataset["version_id"][:36])
        with mlflow.start_run(run_id=run_id):
            mlflow.log_input(ds, context="training")
    c.log_artifacts(run_id, str(train_out / "adapter"), artifact_path="adapter")
    for name in ("metrics.json", "manifest.json", "loss_curve.png", "tokenizer_ref.json"):
        if (train_out / name).exists():
            c.log_artifact(run_id, str(train_out / name), artifact_path="training")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]


def _as_version(mv) -> ModelVersion:
    return ModelVersion(mv.name, str(mv.version), mv.run_id, mv.source, dict(mv.tags))


def register(run_id: str, run_key: str, *, tags: dict[str, str], name: str,
             alias: str | None = "challenger", description: str | None = None) -> ModelVersion:
    """Register the run's adapter once; a retry returns the version the first attempt made."""
    c = client()
    try:
        c.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException by store
        c.create_registered_model(name, description=description or f"LoRA adapters for {name} (Tuneship)")
    found = c.search_model_versions(f"name = '{name}' and tags.`{RUN_KEY}` = '{run_key}'")
    if found:
        mv = found[0]
    else:
        source = f"{c.get_run(run_id).info.artifact_uri}/adapter"
        mv = c.create_model_version(name, source=source, run_id=run_id, tags={RUN_KEY: run_key, **tags})
    if alias:
        c.set_registered_model_alias(name, alias, str(mv.version))
    return _as_version(c.get_model_version(name, str(mv.version)))


def by_alias(alias: str, name: str) -> ModelVersion | None:
    c = client()
    try:
        return _as_version(c.get_model_version_by_alias(name, alias))
    except Exception:  # noqa: BLE001 - no such model or alias
        return None


def latest_version(name: str) -> int | None:
    """The newest version number registered under `name` (None: none yet)."""
    versions = [int(mv.version) for mv in client().search_model_versions(f"name = '{name}'")]
    return max(versions) if versions else None


def run_metric(run_id: str, key: str) -> float | None:
    """A run's latest value of metric `key` (None when the run has none)."""
    value = client().get_run(run_id).data.metrics.get(key)
    return float(value) if value is not None else None


def get_version(version: str, name: str) -> ModelVersion:
    return _as_version(client().get_model_version(name, str(version)))


def set_alias(alias: str, version: str, name: str) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def delete_alias(alias: str, name: str) -> None:
    client().delete_registered_model_alias(name, alias)


def set_version_tags(version: str, tags: dict[str, str], name: str) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))


def download_adapter(mv: ModelVersion, dest: Path) -> Path:
    """The adapter files of a registered version (a local copy for compile and eval)."""
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    _mlflow()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dest)))


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    c = client()
    c.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()])


def log_artifact(run_id: str, path: Path, artifact_path: str) -> None:
    client().log_artifact(run_id, str(path), artifact_path=artifact_path)
