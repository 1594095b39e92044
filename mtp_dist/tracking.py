"""MLflow tracking (rank 0 only) behind a tiny interface; `NullTracker` when tracking is off.

URI precedence: config `tracking.uri` > env MLFLOW_TRACKING_URI > sqlite:///<run_dir>/mlflow.db
(MLflow 3 refuses the plain file store: "maintenance mode" unless MLFLOW_ALLOW_FILE_STORE=true).
A resumed run continues its MLflow run: the run id is kept in <run_dir>/mlflow_run_id.
Every run is tagged `mtp_dist_version` and `git_commit` (mtp_dist/version.py).
`check_uri` refuses a URI MLflow cannot use before any work is done, without importing MLflow.

Experiments this creates are tagged `mlflow.experimentKind=custom_model_development`, which the
MLflow 3.17 UI reads as a training experiment ("Training runs"). The UI's "GenAI | Model
training" switch at the top left is kept in the browser (localStorage), not in the experiment,
and starts at GenAI in a fresh browser: switch it once (README, MLflow section).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .config import ConfigError, RunConfig, to_flat_dict
from .version import version_tags

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# The schemes of MLflow's tracking-store registry (mlflow.tracking._tracking_service.utils,
# MLflow 3.17), written out so that checking a URI costs no MLflow import (~3 s); plugins add
# theirs under the entry point group below. "" is a plain path (the file store).
STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https")
STORE_NAMES = ("databricks", "databricks-uc", "uc")  # whole URIs, or schemes of a profile
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # also as SQLAlchemy's `mysql+pymysql`
PLUGIN_GROUP = "mlflow.tracking_store"

# Loggers whose INFO lines are the libraries' business, not the user's: MLflow's "Creating
# initial MLflow database tables", alembic's migrations, DeepSpeed's configuration dump.
LIBRARY_LOGGERS = ("mlflow", "alembic", "sqlalchemy", "huey", "DeepSpeed", "deepspeed")


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


def _uri_key(cfg: RunConfig) -> str:
    """Where the URI came from, as the user would set it."""
    if cfg.tracking.uri:
        return "tracking.uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"


def why_unwritable(path: Path) -> str | None:
    """Why `path` cannot be a directory this process writes in (None: it can, made if need
    be). The nearest existing ancestor decides, by a directory made and removed in it at once:
    permission bits do not tell (root passes them on a read-only or virtual file system)."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory"
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".mtp-write-check-", dir=parent))
            except OSError as err:
                return f"{parent}: {err.strerror or err}"
            return None
    return None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of sqlite:///relative.db or sqlite:////absolute.db (None: in memory)."""
    path = uri.split("://", 1)[1][1:].split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """Why an HTTP tracking server cannot be reached (None: something answered)."""
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # a server answered (an error page is an answer: auth is MLflow's to judge)
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))
    return None


def check_uri(cfg: RunConfig) -> None:
    """Refuse (ConfigError, one line) a tracking URI MLflow cannot use: an unknown scheme, the
    file store MLflow 3 refuses, a SQLite file whose directory cannot be made, an HTTP server
    that does not answer. Cheap: no MLflow import, at most one HTTP request."""
    if not cfg.tracking.enabled:
        return
    uri, key = tracking_uri(cfg), _uri_key(cfg)
    where = f"{key}={uri}"
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    database = next((db for db in DATABASES if scheme.split("+")[0] == db), None)
    plugins = {e.name for e in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    known = (*STORE_SCHEMES, *STORE_NAMES, *plugins)
    if uri not in STORE_NAMES and database is None and scheme not in known:
        shown = ", ".join(s for s in known if s)
        raise ConfigError(f"{where}: unknown scheme {scheme!r} (MLflow stores: {shown})")
    if scheme in ("", "file"):
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")
        if not allowed:
            raise ConfigError(
                f"{where}: MLflow 3 refuses the file store unless MLFLOW_ALLOW_FILE_STORE=true; "
                "use a database, e.g. sqlite:///PATH/mlflow.db"
            )
        path = Path(urllib.parse.urlparse(uri).path if scheme == "file" else uri)
        why = why_unwritable(path)
    elif database == "sqlite":
        path = _sqlite_path(uri)
        why = None if path is None else why_unwritable(path.parent)
    elif scheme in ("http", "https"):
        why = _reachable(uri)
        if why is not None:
            raise ConfigError(f"{where}: the tracking server does not answer ({why})")
        return
    else:
        return  # other databases and Databricks: their drivers and credentials say
    if why is not None:
        raise ConfigError(f"{where}: cannot write there ({why})")


_quiet = False


def quiet_library_logs() -> None:
    """Keep third-party INFO lines off the console from now on (WARNING and above still show):
    `mtp train` without -v. MLflow sets its loggers' levels when it is imported, so the tracker
    applies this again after importing it."""
    global _quiet
    _quiet = True
    _apply_quiet()


def _apply_quiet() -> None:
    if _quiet:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


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
    database = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if database is not None:  # SQLite makes the file, not its directory (check_uri: it can be)
        database.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(
            experiment, artifact_location=artifacts_dir.resolve().as_uri(), tags=EXPERIMENT_KIND
        )
    mlflow.set_experiment(experiment)


class MLflowTracker:
    def __init__(self, cfg: RunConfig) -> None:
        import mlflow  # ~3 s import: only when tracking is on
        from mlflow.exceptions import MlflowException

        _apply_quiet()
        self._mlflow = mlflow
        try:
            self._start(cfg)
        except MlflowException as err:  # a store check_uri could not judge
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            uri = f"{_uri_key(cfg)}={tracking_uri(cfg)}"
            raise ConfigError(f"{uri}: MLflow could not start a run: {first}") from err

    def _start(self, cfg: RunConfig) -> None:
        mlflow = self._mlflow
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
