"""A throw-away PostgreSQL server for the tests that need a real one (sweeps and cv members across machines).

`ThrowawayPostgres` runs Debian's server binaries (``initdb``, ``pg_ctl``; found on ``PATH`` or under
``/usr/lib/postgresql/<version>/bin``): ``initdb`` into a new temporary folder, then ``pg_ctl start`` with
TCP only on 127.0.0.1 at a free port (its Unix socket in the same folder, so nothing outside it is touched).
The superuser ``postgres`` logs in over TCP with a password (scram-sha-256), so a wrong password is refused
as on a real server. ``initdb`` refuses to run as root: as root, the folder is handed to the ``postgres``
user and the binaries run as that user (``runuser``). `stop` shuts the server down at once and removes the
folder; the pytest fixture (``conftest.postgres_url``) calls it at the end of the session, also when a test
failed, and `atexit` does if the session ends otherwise.

`unavailable` says why no server can start here (no binaries, no driver, root without a ``postgres`` user):
the tests skip with that reason. ``IGNITE_TRAINER_TEST_POSTGRES=postgresql://...`` uses a server that
already runs instead.

    with ThrowawayPostgres() as server:
        url = server.create_database("sweep_a")   # postgresql://postgres:...@127.0.0.1:PORT/sweep_a
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["ThrowawayPostgres", "unavailable", "create_database", "free_port", "EXTERNAL_ENV"]

EXTERNAL_ENV = "IGNITE_TRAINER_TEST_POSTGRES"
SUPERUSER = "postgres"


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def unavailable() -> str | None:
    """Why no throw-away server can be used here, or None."""
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy uses for a plain postgresql:// URL)
    except ImportError:
        return "the PostgreSQL driver is not installed (pip install -e '.[postgres]')"
    if os.environ.get(EXTERNAL_ENV):
        return None
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database(url: str, name: str) -> str:
    """A new, empty database ``name`` (dropped first if one is there) on the server of ``url``; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(url).set(database=name).render_as_string(hide_password=False)


class ThrowawayPostgres:
    """One PostgreSQL server in a temporary folder, on 127.0.0.1 at a free port."""

    def __init__(self) -> None:
        self.password = secrets.token_hex(8)
        self.folder: Path | None = None
        self.port: int | None = None
        self.external = os.environ.get(EXTERNAL_ENV)

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "ThrowawayPostgres":
        if self.external:
            return self
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.folder = Path(tempfile.mkdtemp(prefix="ignite-pg-"))
        atexit.register(self.stop)
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.folder / "data"), "-U", SUPERUSER, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        self.port = free_port()
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-o", options, "-l", str(self.folder / "server.log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        """Shut the server down at once and remove its folder (safe to call twice)."""
        if self.folder is None:
            return
        folder, self.folder = self.folder, None
        if (folder / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(folder / "data"), "-m", "immediate", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> "ThrowawayPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------------- use
    def url(self, database: str = "postgres", password: str | None = None, port: int | None = None) -> str:
        """A plain ``postgresql://`` URL for ``database`` (SQLAlchemy picks the psycopg driver)."""
        if self.external:
            base = self.external.rsplit("/", 1)[0]
            return f"{base}/{database}"
        return (f"postgresql://{SUPERUSER}:{self.password if password is None else password}@127.0.0.1:"
                f"{self.port if port is None else port}/{database}")

    def create_database(self, name: str) -> str:
        """A new, empty database (dropped first if a previous test left one) and its URL."""
        return create_database(self.url("postgres"), name)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(_bin_dir() / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.folder or "/")
        if done.returncode != 0:
            log = ""
            if self.folder and (self.folder / "server.log").exists():
                log = (self.folder / "server.log").read_text()[-2000:]
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]} {log}")
