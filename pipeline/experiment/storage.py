"""Database URLs shared by workers: SQLite on one machine, PostgreSQL across machines."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
from pathlib import Path

from pipeline.experiment.config import ConfigError

POSTGRES_EXTRA = "pip install -e '.[postgres]'"


def database_url(url: str, option: str) -> str:
    """The SQLAlchemy URL for ``url``: ``postgresql://`` uses psycopg 3 (the ``postgres`` extra), refused in one
    line when it is not installed; a SQLite file's folder is created."""
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(f"{option}: {url.split(':')[0]} needs the PostgreSQL driver: {POSTGRES_EXTRA}")
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return url
    raise ConfigError(f"{option}: expected sqlite:///<file> or postgresql://<user>@<host>:<port>/<db>, got {url!r}")


@contextlib.contextmanager
def store_lock(uri: str):
    """Workers starting together on one SQLite file: one at a time creates its tables (MLflow's
    migrations, Optuna's and the sweep's table creation are not safe to run twice at once).
    Nothing to lock for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
