"""Throwaway servers on 127.0.0.1 for the scale-out tests: a PostgreSQL cluster and an MLflow server.

PostgreSQL: ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` (or ``$AUROR_PG_BIN``) in a temp
folder, password authentication (``scram-sha-256``) for every connection, listening on 127.0.0.1 only,
a free port; run as the user ``nobody`` when the tests run as root (``initdb`` refuses root). The
superuser ``postgres`` has a throwaway password of its own (``--pwfile``); the tests log in as the role
``auror`` (its own throwaway password, given through ``PGPASSWORD`` or a ``PGPASSFILE``, never in a URL).

MLflow: ``mlflow server --app-name basic-auth`` on a free loopback port, a throwaway admin password
(``MLFLOW_AUTH_CONFIG_PATH``), and a user ``worker`` with its own, created through the admin; clients log
in with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

Both start within bounded waits and are stopped and removed after the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PG_BIN_ENV = "AUROR_PG_BIN"
PG_USER = "auror"  # the role the workers log in as (CREATEDB, owner of the database auror)
MLFLOW_USER = "worker"  # the tracking server's user the workers log in as
START_S = 120  # the longest a server may take to start
# the admin creates a user the way the README does it (the password on stdin, never on a command line)
CREATE_USER = ("import sys; from mlflow.server import get_app_client; get_app_client('basic-auth', "
               "tracking_uri=sys.argv[1]).create_user(sys.argv[2], sys.stdin.read().strip())")


def throwaway_password(what: str) -> str:
    """A fresh random password, easy to search for in everything a run leaves (no ``:`` or ``\\``: a
    ``.pgpass`` line needs none escaped)."""
    return f"throwaway-{what}-{secrets.token_urlsafe(18)}"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    candidates = [os.environ.get(PG_BIN_ENV, ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def psycopg_missing() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    return None


def mlflow_auth_missing() -> str | None:
    if importlib.util.find_spec("flask_wtf") is None:
        return "mlflow server --app-name basic-auth needs Flask-WTF (pip install 'mlflow[auth]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as nobody then."""
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A running cluster. ``url`` names the role but no password: a client gives ``password`` through
    ``PGPASSWORD`` (:meth:`env`) or a ``~/.pgpass``-style file named by ``PGPASSFILE`` (:meth:`pgpass`)."""

    port: int
    password: str
    user: str = PG_USER

    @property
    def url(self) -> str:
        return self.database("auror")

    def database(self, name: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def pgpass(self, path: Path) -> Path:
        """A password file for this role on this server (libpq ignores one that others may read)."""
        path.write_text(f"127.0.0.1:{self.port}:*:{self.user}:{self.password}\n")
        path.chmod(0o600)
        return path


@contextlib.contextmanager
def postgres_server(base: Path) -> Iterator[Postgres]:
    """A running cluster with an empty database ``auror`` owned by the role ``auror``."""
    bin_dir = postgres_bin()
    data, sockets = base / "pgdata", base / "pgsock"
    for folder in (base, sockets):
        folder.mkdir(parents=True, exist_ok=True)
    superuser_password, password = throwaway_password("pgsuper"), throwaway_password("pg")
    pwfile = base / "superuser.pw"  # initdb reads the superuser's password from it; removed right after
    pwfile.write_text(superuser_password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:  # nobody must be able to write the cluster's folders and read the password file
        for path in (base, sockets, pwfile):
            shutil.chown(path, "nobody", "nogroup")
        with contextlib.suppress(OSError):  # pytest's tmp folders are private to root
            for parent in base.parents:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
    port = free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=START_S)
    try:
        subprocess.run(as_server_user([str(bin_dir / "initdb"), "-D", str(data), "--auth=scram-sha-256",
                                       f"--pwfile={pwfile}", "-U", "postgres", "--no-sync"]), **run)
    finally:
        pwfile.unlink(missing_ok=True)
    subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w",
                                   "-t", str(START_S), "-o", f"-h 127.0.0.1 -p {port} -k {sockets} -F", "start"]),
                   **run)
    try:
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=superuser_password,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(PG_USER), sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE auror OWNER {}").format(sql.Identifier(PG_USER)))
        yield Postgres(port, password)
    finally:
        subprocess.run(as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server --app-name basic-auth``: ``url``, the workers' user and password
    (:meth:`env`), and the admin's (:meth:`admin_env`)."""

    url: str
    password: str
    admin_password: str
    username: str = MLFLOW_USER
    admin_username: str = "admin"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def admin_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.admin_username, "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def without_credentials(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any MLflow tracking credentials or PostgreSQL password."""
    gone = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
    return {k: v for k, v in env.items() if k not in gone}


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path, env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """``mlflow server --app-name basic-auth`` on a free loopback port, its artifacts, users, auth
    config and log under ``folder``; ``env`` adds to its environment (e.g. ``PGPASSWORD`` for
    ``backend_uri``)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin_password, password = throwaway_password("mlflow-admin"), throwaway_password("mlflow")
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\n"
                      "default_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                      "admin_username = admin\n"
                      f"admin_password = {admin_password}\n"
                      "auth_cache_ttl_seconds = 60\n")  # a password is hashed once a minute, not every request
    config.chmod(0o600)
    server_env = {**without_credentials(os.environ), **(env or {}), "MLFLOW_AUTH_CONFIG_PATH": str(config),
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--app-name", "basic-auth",
           "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    log = folder / "mlflow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env)
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        server = MlflowServer(url, password, admin_password)
        subprocess.run([sys.executable, "-c", CREATE_USER, url, server.username], input=password, text=True,
                       check=True, capture_output=True, timeout=START_S,
                       env={**without_credentials(os.environ), **server.admin_env()})
        yield server
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# A worker's heartbeat every 2 s and a takeover after 8 s without one (10 s and 45 s in a real run), set
# before the queue and the studies import them: a test that kills a worker or its storage waits seconds
# for the takeover, not most of a minute.
FAST_HEARTBEAT = ("import sys; import pipeline.experiment.storage as s; s.HEARTBEAT_S, s.GRACE_PERIOD_S = 2, 8; "
                  "from pipeline.experiment.cli import main; sys.exit(main(sys.argv[1:]))")


def auror_command(args: list[str]) -> list[str]:
    """``auror <args>`` in a Python process of its own, with :data:`FAST_HEARTBEAT`."""
    return [sys.executable, "-c", FAST_HEARTBEAT, *args]
