"""Where a sweep's study (or a cv experiment's member queue) lives: the storage URL, opening the Optuna storage.

``--storage`` is ``journal:PATH`` (a journal file, for shared file systems) or any SQLAlchemy URL, by
default the SQLite file ``SWEEP_DIR/study.db`` (`storage_url`). A plain ``postgresql://`` URL uses psycopg 3
(SQLAlchemy's default driver; ``pip install -e '.[postgres]'``).

An RDB storage (SQLite, PostgreSQL, MySQL) runs Optuna's heartbeat: a worker records one every
``heartbeat`` seconds while it runs a trial, and a trial whose heartbeat is older than `grace_period` is
failed by the next worker that looks (any host) and queued again (`workers.requeue_stale`). A journal
storage has no heartbeat: there, only a worker on the dead worker's own machine can tell that it died
(`workers.worker_alive`), so a journal sweep spread over machines needs each machine to restart its own.

Several workers may open a new storage and create the same study at the same moment: on a server, the
loser of that race gets an integrity error from the database (a table, a version row or the study name
created twice; SQLite's "table already exists"). Opening and creating are therefore retried a few times
(`retrying`), and a study that exists is joined. A study is joined only when it was created from the same
space (`open_study`). SQLite is put in write-ahead-log mode. Passwords in a URL are never shown: every error
names the URL without it (`retrying` is the one place a driver's exception becomes that line).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ignite_trainer.core.errors import ConfigError
from ignite_trainer.core.vocabulary import GRACE_HEARTBEATS, HEARTBEAT_INTERVAL
from ignite_trainer.experiments.sampler import TrialSeededSampler, make_pruner
from ignite_trainer.experiments.space import SweepSpace, space_to_dict
from ignite_trainer.experiments.workers import requeue_stale

__all__ = ["storage_url", "open_storage", "open_study", "has_heartbeat", "grace_period", "redacted", "retrying",
           "HEARTBEAT_INTERVAL", "GRACE_HEARTBEATS"]

#: Attempts at opening a storage and creating a study when workers race on creating them.
_ATTEMPTS = 5


def grace_period(heartbeat: int) -> int:
    """Seconds without a heartbeat after which a running trial counts as dead."""
    return GRACE_HEARTBEATS * heartbeat


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage can tell a dead worker on another machine (an RDB storage with the heartbeat on)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """``--storage`` as given, or the embedded SQLite file ``SWEEP_DIR/study.db``."""
    return storage or f"sqlite:///{(Path(sweep_dir) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int = HEARTBEAT_INTERVAL) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: ``journal:PATH`` is a journal file (for shared file systems), anything
    else an SQLAlchemy URL (SQLite, PostgreSQL, MySQL) with Optuna's heartbeat on, every ``heartbeat``
    seconds. Any failure (a missing driver, an unreachable server, wrong credentials, a database that does not
    exist) is one `ConfigError` naming the URL without its password."""
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
        raise ConfigError(f"--heartbeat={heartbeat!r} must be an integer number of seconds >= 1")
    return retrying(url, lambda: _open_storage(url, heartbeat))


def _open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {redacted(url)}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat arguments
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                                 grace_period=grace_period(heartbeat),
                                                 heartbeat_stale_trial_callback=requeue_stale)
    except ImportError as e:  # Optuna's own message does not say which driver
        missing = getattr(e.__cause__ or e.__context__ or e, "name", None)
        hint = " (pip install -e '.[postgres]')" if url.startswith("postgresql") else ""
        raise ConfigError(f"--storage {redacted(url)}: its database driver{f' {missing!r}' if missing else ''} is "
                          f"not installed{hint}") from None
    if url.startswith("sqlite"):
        _write_ahead_log(storage)
    return storage


def _is_race(e: BaseException) -> bool:
    """The database says another worker created the same table, row or study first (an integrity error, or
    SQLite's "table ... already exists" while both create the tables)."""
    text = str(e)
    return isinstance(e, IntegrityError) or "already exists" in text or "duplicate key" in text


def retrying(url: str, attempt: Callable[[], Any], doing: str = "open") -> Any:
    """Call ``attempt`` again (after a short wait) while it loses a creation race to another worker (the
    database's integrity error); any other failure of the driver or the database (drivers raise their own
    types: a refused connection, wrong credentials, a bad file) is one `ConfigError`, ``cannot <doing> the
    storage``, naming ``url`` without its password. A `ConfigError` of ``attempt`` passes through."""
    for n in range(_ATTEMPTS):
        try:
            return attempt()
        except ConfigError:
            raise
        except Exception as e:
            if not _is_race(e) or n == _ATTEMPTS - 1:
                raise ConfigError(f"--storage {redacted(url)}: cannot {doing} the storage "
                                  f"({_first_line(e, url)})") from None
            time.sleep(0.2 * (n + 1))
    raise AssertionError("unreachable")


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
    return retrying(url, lambda: _open_study(space, storage, study_name, url), doing="use")


def _open_study(space: SweepSpace, storage: optuna.storages.BaseStorage, study_name: str, url: str) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=study_name, direction=space.direction,
                                sampler=TrialSeededSampler(space.sampler, space.seed), pruner=make_pruner(space),
                                load_if_exists=True)
    fingerprint = study.user_attrs.get("space_fingerprint")
    if fingerprint is None:
        study.set_user_attr("space", space_to_dict(space))  # also proves the storage can be written
        study.set_user_attr("space_fingerprint", space.fingerprint())
    elif fingerprint != space.fingerprint():
        raise ConfigError(f"--storage {redacted(url)}: study '{study_name}' was created from a different space; "
                          f"use another sweep directory or --study name")
    if study.direction.name.lower() != space.direction:
        raise ConfigError(f"--storage {redacted(url)}: study '{study_name}' is {study.direction.name.lower()}d, "
                          f"the space asks to {space.direction}")
    return study


def redacted(url: str) -> str:
    """``url`` with its password shown as ``***``."""
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _first_line(e: BaseException, url: str) -> str:
    """The exception's first line, with the URL's password (should a driver repeat it) blanked out."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    try:
        password = make_url(url).password if "://" in url else None
    except Exception:
        password = None
    return line.replace(str(password), "***") if password else line
