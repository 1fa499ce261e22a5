"""Where a sweep's study lives: the storage URL, opening and tuning the Optuna storage, creating or joining the study.

``--storage`` is ``journal:PATH`` (a journal file, for shared file systems) or any SQLAlchemy URL, by
default the SQLite file ``SWEEP_DIR/study.db`` (`storage_url`). An RDB storage runs Optuna's heartbeat,
whose stale trials `workers.requeue_stale` queues again; SQLite is put in write-ahead-log mode. A study is
joined only when it was created from the same space (`open_study`). Passwords in a URL are never shown.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from sqlalchemy import event
from sqlalchemy.engine import make_url

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.experiments.sampler import TrialSeededSampler, make_pruner
from ignite_trainer.experiments.space import SweepSpace, space_to_dict
from ignite_trainer.experiments.workers import requeue_stale

__all__ = ["storage_url", "open_storage", "open_study", "HEARTBEAT_INTERVAL", "HEARTBEAT_GRACE"]

#: Seconds between a trial's heartbeats on an RDB storage, and how long one may be missing before the
#: trial counts as dead. A training epoch may take minutes; the heartbeat runs in its own thread.
HEARTBEAT_INTERVAL = 30
HEARTBEAT_GRACE = 180


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """``--storage`` as given, or the embedded SQLite file ``SWEEP_DIR/study.db``."""
    return storage or f"sqlite:///{(Path(sweep_dir) / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: ``journal:PATH`` is a journal file (for shared file systems), anything
    else an SQLAlchemy URL (SQLite, PostgreSQL, MySQL) with Optuna's heartbeat on."""
    shown = _redacted(url)
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):]).expanduser()
            if not path.parent.is_dir():
                raise ConfigError(f"--storage {shown}: folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat arguments
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                                 grace_period=HEARTBEAT_GRACE,
                                                 heartbeat_stale_trial_callback=requeue_stale)
        if url.startswith("sqlite"):
            _write_ahead_log(storage)
        return storage
    except ConfigError:
        raise
    except Exception as e:  # drivers raise their own types: a missing module, a refused connection, a bad file
        raise ConfigError(f"--storage {shown}: cannot open the storage ({_first_line(e)})") from None


def _write_ahead_log(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints rather than at every commit: a trial writes
    about 18 small transactions, and with the default rollback journal each waits for its own fsync
    (measured 0.5 s a trial on a busy machine). A power cut may lose the last commits, never the file."""
    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened while creating the tables pick the pragmas up again


def open_study(space: SweepSpace, storage: optuna.storages.BaseStorage, study_name: str, url: str) -> optuna.Study:
    """Create the study, or join it when it exists and was created from the same space."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=space.direction,
                                    sampler=TrialSeededSampler(space.sampler, space.seed), pruner=make_pruner(space),
                                    load_if_exists=True)
        fingerprint = study.user_attrs.get("space_fingerprint")
        if fingerprint is None:
            study.set_user_attr("space", space_to_dict(space))  # also proves the storage can be written
            study.set_user_attr("space_fingerprint", space.fingerprint())
        elif fingerprint != space.fingerprint():
            raise ConfigError(f"--storage {_redacted(url)}: study '{study_name}' was created from a different space; "
                              f"use another sweep directory or --study name")
        if study.direction.name.lower() != space.direction:
            raise ConfigError(f"--storage {_redacted(url)}: study '{study_name}' is {study.direction.name.lower()}d, "
                              f"the space asks to {space.direction}")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--storage {_redacted(url)}: cannot use the storage ({_first_line(e)})") from None
    return study


def _redacted(url: str) -> str:
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
