"""Optional experiment tracking in MLflow, through Ignite's `MLflowLogger`.

A run directory already holds everything about one run; a tracker is for comparing many runs in a UI and
keeping them beside other projects' runs. MLflow is an optional extra (``pip install 'ignite_trainer[mlflow]'``,
the light ``mlflow-skinny`` client): it is imported only when tracking is asked for, and its absence is one
`ConfigError`, raised by `require_mlflow` before anything is written; so is a tracking server that cannot be
reached (`check_tracking`: one quick request, before the run directory exists).

What one training run logs (to MLflow run named after the run directory, in experiment ``ignite_trainer``):

- params: every `TrainConfig` field; tags ``run_dir`` (the resolved run directory, which a resume uses to
  continue the same MLflow run) and, at the end, ``state`` (finished, stopped early or interrupted);
- metrics per validated epoch at ``step = epoch``: ``val <score>`` for every validation score and
  ``val <label>.auroc`` / ``val <label>.auprc``, ``epoch train_loss``, ``epoch seconds``, ``epoch val_seconds``,
  ``epoch best_epoch``, ``epoch best_score`` (`epoch_scalars.EpochScalars`; names are Ignite's ``"<tag> <name>"``),
  and ``lr group_0`` at the start of each epoch;
- artifacts when training completes: the best checkpoint (``checkpoints/``), ``config.yaml``,
  ``metrics.jsonl`` and the ``report/`` folder when one exists.

The default store is a local folder, ``<output_dir>/mlruns`` (MLflow's file store; read it with
``mlflow ui --backend-store-uri runs/mlruns`` from the full ``mlflow`` package); any tracking URI works otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, MLflowLogger

from ignite_trainer.runs.rundir import RunDirectory
from ignite_trainer.core.config import TrainConfig
from ignite_trainer.runs.checkpoint import find_best_checkpoint
from ignite_trainer.training.epoch_scalars import EpochScalars
from ignite_trainer.core.errors import CheckpointError, ConfigError
from ignite_trainer.training.events import TrainerEvents

__all__ = ["require_mlflow", "check_tracking", "shown_uri", "default_tracking_uri", "attach_mlflow", "close_mlflow",
           "EXPERIMENT"]

EXPERIMENT = "ignite_trainer"
#: Tracking URIs of a server, reached over the network (a local folder or database needs no check).
_SERVER_SCHEMES = ("http", "https")
#: The one request that checks a server: no retries (MLflow's default backs off for minutes), a short timeout.
_CHECK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^\"')]+)")


def require_mlflow() -> Any:
    """The ``mlflow`` module, or a `ConfigError` saying how to install it.

    Example::

        require_mlflow()   # before the run directory is created: a missing extra costs nothing
    """
    try:
        import mlflow  # deferred: an optional extra, needed only with tracker=mlflow
    except ImportError:
        raise ConfigError("tracker=mlflow needs MLflow, which is not installed: "
                          "pip install 'ignite_trainer[mlflow]' (or mlflow-skinny)") from None
    return mlflow


def check_tracking(config: TrainConfig) -> None:
    """Refuse, before the run directory exists, a ``tracker=mlflow`` run that could not log: MLflow is not
    installed (`require_mlflow`), or the tracking server of ``tracking_uri`` does not answer MLflow's API.
    The message names the URI without its password. A local store (the default) is not checked.

    Example::

        check_tracking(TrainConfig(tracker="mlflow", tracking_uri="http://localhost:1"))
        # ConfigError: tracking_uri=http://localhost:1: cannot reach the MLflow tracking server (Connection refused); ...
    """
    if config.tracker != "mlflow":
        return
    require_mlflow()
    uri = config.tracking_uri
    if not uri or urlsplit(uri).scheme not in _SERVER_SCHEMES:
        return
    from mlflow.tracking import MlflowClient  # deferred: the optional extra, checked by require_mlflow above

    try:
        with _environment(_CHECK_ENV):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow's and requests' errors alike: the server did not answer
        raise ConfigError(f"tracking_uri={shown_uri(uri)}: cannot reach the MLflow tracking server "
                          f"({_reason(e, uri)}); start it, fix --tracking-uri, or drop --tracker mlflow") from None


def shown_uri(uri: str) -> str:
    """``uri`` as it may be printed or logged: a password in it becomes ``***``.

    Example:

        >>> shown_uri("https://me:s3cret@mlflow.example.org")
        'https://me:***@mlflow.example.org'
    """
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _reason(error: BaseException, uri: str) -> str:
    """What went wrong, short and without the password: the OS error (``Connection refused``) when there is
    one, else the first line of the message."""
    text = str(error)
    found = _OS_REASON.findall(text)
    if found:
        return found[-1].strip()
    line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    password = urlsplit(uri).password
    line = line.replace(uri, shown_uri(uri))
    return (line.replace(password, "***") if password else line)[:200]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_tracking_uri(output_dir: str | Path) -> str:
    """The local store ``<output_dir>/mlruns`` as a ``file://`` URI.

    Example:

        >>> default_tracking_uri("/tmp/runs")
        'file:///tmp/runs/mlruns'
    """
    return (Path(output_dir).expanduser().resolve() / "mlruns").as_uri()


def _allow_local_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set (it recommends a database).

    A folder of plain files next to the runs is what this project offers by default, and it needs no
    database driver, so the opt-out is set for a local path or ``file:`` URI (never overriding the user's).
    """
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def attach_mlflow(trainer: Engine, optimizer: Any, config: TrainConfig, run_dir: str | Path, *,
                  tracking_uri: str | None = None, experiment: str = EXPERIMENT, val_dataset: Any = None,
                  best_checkpoint: Checkpoint | None = None) -> Any:
    """Start (or, on resume, continue) the MLflow run of ``run_dir`` and log to it as the module says.

    Attach on rank 0, after `attach_best_checkpoint` and after a resume's state is restored; the arguments
    ``val_dataset`` and ``best_checkpoint`` are `EpochScalars`'s. Returns Ignite's `MLflowLogger`; end the
    run with `close_mlflow` when training ends, passing the exception if it failed.

    Example::

        tracker = attach_mlflow(trainer, optimizer, config, run_dir, val_dataset=val_dataset, best_checkpoint=best)
        error = None
        try:
            trainer.run(train_loader, max_epochs=config.epochs)
        except BaseException as e:
            error = e
            raise
        finally:
            close_mlflow(tracker, error)
    """
    mlflow = require_mlflow()
    from mlflow.tracking import MlflowClient  # deferred: the optional extra, checked by require_mlflow above

    run_dir = Path(run_dir).resolve()
    uri = tracking_uri or default_tracking_uri(config.output_dir)
    _allow_local_file_store(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    earlier = MlflowClient(uri).search_runs([experiment_id], filter_string=f"tags.run_dir = '{run_dir}'",
                                            max_results=1, order_by=["attributes.start_time DESC"])
    if earlier and trainer.state.epoch:  # a resume continues its run; a new run of the same name starts anew
        mlflow.start_run(run_id=earlier[0].info.run_id)
    else:
        mlflow.start_run(run_name=run_dir.name, tags={"run_dir": str(run_dir)})
        mlflow.log_params({k: "" if v is None else v for k, v in config.to_dict().items()})
    logger = MLflowLogger(tracking_uri=uri)  # takes over the active run

    scalars = EpochScalars(trainer, monitor=config.monitor, val_dataset=val_dataset, best_checkpoint=best_checkpoint)
    logger.attach_output_handler(trainer, event_name=TrainerEvents.VALIDATION_COMPLETED, tag="val",
                                 output_transform=lambda _: scalars.validation(trainer))
    logger.attach_output_handler(trainer, event_name=TrainerEvents.VALIDATION_COMPLETED, tag="epoch",
                                 output_transform=lambda _: scalars.epoch(trainer))
    logger.attach_opt_params_handler(trainer, event_name=Events.EPOCH_STARTED, optimizer=optimizer)
    trainer.add_event_handler(Events.COMPLETED, _log_outcome, logger, run_dir, best_checkpoint)
    return logger


def _best_file(run_dir: Path, best_checkpoint: Checkpoint | None) -> Path | None:
    """The file the best-checkpoint handler holds as best, else the run directory's best by name."""
    if best_checkpoint is not None and best_checkpoint.last_checkpoint is not None:
        return Path(best_checkpoint.last_checkpoint)
    try:
        return find_best_checkpoint(run_dir)
    except CheckpointError:
        return None  # no epoch validated: nothing to keep


def _log_outcome(trainer: Engine, logger: Any, run_dir: Path, best_checkpoint: Checkpoint | None) -> None:
    """At the end of training: how it ended, and the files a reader of the MLflow run wants."""
    if getattr(trainer.state, "early_stopped_epoch", None) is not None:
        state = "stopped early"
    elif trainer.state.epoch >= (trainer.state.max_epochs or 0):
        state = "finished"
    else:
        state = "interrupted"  # a hook called terminate(): the run can be resumed
    logger.set_tag("state", state)
    run = RunDirectory(run_dir)
    best = _best_file(run_dir, best_checkpoint)
    if best is not None and best.is_file():
        logger.log_artifact(str(best), artifact_path=run.checkpoints.name)
    for path in (run.config_file, run.metrics_file):
        if path.is_file():
            logger.log_artifact(str(path))
    if run.report.is_dir():
        logger.log_artifacts(str(run.report), artifact_path=run.report.name)


def close_mlflow(logger: Any, error: BaseException | None = None) -> None:
    """End the MLflow run: FINISHED, KILLED for Ctrl-C, FAILED for any other exception.

    Example::

        close_mlflow(tracker)                 # after trainer.run returned
        close_mlflow(tracker, KeyboardInterrupt())
    """
    import mlflow  # deferred: the optional extra; only a run that tracks to MLflow gets here

    if error is None:
        logger.close()
        return
    mlflow.set_tag("state", "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
    mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
