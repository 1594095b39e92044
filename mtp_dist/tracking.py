"""MLflow tracking (rank 0 only) behind a tiny interface; `NullTracker` when tracking is off.

URI precedence: config `tracking.uri` > env MLFLOW_TRACKING_URI > sqlite:///<run_dir>/mlflow.db
(MLflow 3 refuses the plain file store: "maintenance mode" unless MLFLOW_ALLOW_FILE_STORE=true).
A resumed run continues its MLflow run: the run id is kept in <run_dir>/mlflow_run_id.
Every run is tagged `mtp_dist_version` and `git_commit` (mtp_dist/version.py).

Experiments this creates are tagged `mlflow.experimentKind=custom_model_development`, which the
MLflow 3.17 UI reads as a training experiment ("Training runs"). The UI's "GenAI | Model
training" switch at the top left is kept in the browser (localStorage), not in the experiment,
and starts at GenAI in a fresh browser: switch it once (README, MLflow section).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import RunConfig, to_flat_dict
from .version import version_tags

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def use_mlflow(uri: str, experiment: str, artifacts_dir: Path) -> None:
    """Point MLflow at `uri` and `experiment`, creating it with its artifacts in `artifacts_dir`
    for a database store (otherwise they land in ./mlruns of the working directory -- for a
    Slurm job, the submission directory)."""
    import mlflow

    outer = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI for subprocesses; undo that, so a later
    # run in this process (or a process it starts) resolves its own URI.
    if outer is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = outer
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(
            experiment, artifact_location=artifacts_dir.resolve().as_uri(), tags=EXPERIMENT_KIND
        )
    mlflow.set_experiment(experiment)


class MLflowTracker:
    def __init__(self, cfg: RunConfig) -> None:
        import mlflow  # ~3 s import: only when tracking is on

        self._mlflow = mlflow
        use_mlflow(tracking_uri(cfg), cfg.tracking.experiment, Path(cfg.run_dir) / "mlartifacts")
        id_file = Path(cfg.run_dir) / "mlflow_run_id"
        previous = id_file.read_text().strip() if id_file.is_file() else None
        try:
            run = mlflow.start_run(run_id=previous) if previous else None
        except Exception:  # the old run lives in another store: start a new one
            run = None
        if run is None:
            name = cfg.tracking.run_name or Path(cfg.run_dir).resolve().name
            run = mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v) for k, v in to_flat_dict(cfg).items()})
            id_file.write_text(run.info.run_id)
        # Set at every start, a resume included: the tags name the code that last trained it.
        mlflow.set_tags(version_tags())
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=subdir or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=subdir)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(cfg: RunConfig, is_main: bool):
    return MLflowTracker(cfg) if cfg.tracking.enabled and is_main else NullTracker()


def log_to_training_run(
    checkpoint: str | Path, metrics: dict[str, float], tags: dict[str, str] | None = None
) -> str | None:
    """Add `metrics` (and tags) to the MLflow run that trained `checkpoint` (a checkpoint
    directory `<run_dir>/checkpoints/step_N`, or the run directory), so that held-out quality
    and decoding speed sit beside the training curves and runs compare on them in the UI.

    Finds the run through `<run_dir>/mlflow_run_id` and the run's own config (the URI rule of
    `tracking_uri`). Returns the run id, or None (logging nothing) where the run was trained
    without tracking or its store is gone: evaluation never fails for want of a tracker."""
    from .config import load_config

    path = Path(checkpoint).resolve()
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    id_file, config = run_dir / "mlflow_run_id", run_dir / "config.yaml"
    if not (id_file.is_file() and config.is_file()):
        return None
    cfg = load_config(config)
    cfg.run_dir = str(run_dir)  # where the run is now, if it was moved since
    import mlflow

    try:
        use_mlflow(tracking_uri(cfg), cfg.tracking.experiment, run_dir / "mlartifacts")
        with mlflow.start_run(run_id=id_file.read_text().strip()) as run:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            if tags:
                mlflow.set_tags(tags)
            return run.info.run_id
    except Exception:  # the run lives in another store (moved, or a server now down)
        return None
