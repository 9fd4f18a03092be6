"""Database URLs shared by workers (SQLite on one machine, PostgreSQL across machines), checked the
same way by every command before any work, and the timing every shared table uses."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import re
from pathlib import Path

from pipeline.lazy import sqlalchemy as sa

from pipeline.core.errors import ConfigError

POSTGRES_EXTRA = "pip install -e '.[postgres]'"
EXPECTED = "expected sqlite:///<file> or postgresql://<user>@<host>:<port>/<db>"
SWEEP_STORAGE = "sqlite:///mlruns/sweeps.db"  # the cells of `auror compare` / `auror sweep`
STUDY_STORAGE = "sqlite:///mlruns/optuna.db"  # the trials of `auror tune`
HEARTBEAT_S = 10  # a running cell's or trial's worker refreshes its heartbeat this often ...
GRACE_PERIOD_S = 45  # ... and is presumed dead when the last one is older than this
# ``scheme://user:password@``: what a message must not show, also in a string no parser accepts
_PASSWORD_IN_URL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^\s'\"]*@")


def hide_password(url: str) -> str:
    """``url`` as a message may show it: its password, if any, as ``***`` (SQLAlchemy's
    ``render_as_string(hide_password=True)``); a URL without a password unchanged."""
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        parsed = None
    if parsed is not None and parsed.password is not None:
        return parsed.render_as_string(hide_password=True)
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error about ``url``) with ``url``'s password and any URL's password as ``***``."""
    with contextlib.suppress(sa.exc.ArgumentError, ValueError):
        password = sa.engine.make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return _PASSWORD_IN_URL.sub(r"\1***@", text.replace(url, hide_password(url)))


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def check_sqlite_file(path: Path, option: str) -> None:
    """A file at ``path`` that is not empty and not an SQLite database (a damaged copy, another file named
    like one) is refused in one line; SQLite itself would say so only at the first query."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as err:
        raise ConfigError(f"{option}: cannot read {path} ({err.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise ConfigError(f"{option}: {path} is not an SQLite database; move it away or name another file")


def database_url(url: str, option: str) -> str:
    """The SQLAlchemy URL for ``url``, or a one-line :class:`ConfigError`: ``postgresql://`` needs a
    database name and psycopg 3 (the ``postgres`` extra); ``sqlite:///`` needs a file whose folder
    exists or can be made (it is made). A message shows the URL's password as ``***``."""
    shown = hide_password(url)
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as err:
        raise ConfigError(f"{option}: {EXPECTED}, got {shown!r} (not a valid URL: {scrub(str(err), url)})") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        if not parsed.database:
            raise ConfigError(f"{option}: {EXPECTED}: the database name is missing, got {shown!r}")
        if importlib.util.find_spec("psycopg") is None:
            raise ConfigError(f"{option}: {url.split(':')[0]} needs the PostgreSQL driver: {POSTGRES_EXTRA}")
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite" and url.startswith("sqlite:///"):
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError(f"{option}: {EXPECTED}: the file is missing, got {shown!r}")
        path = Path(database)
        if path.is_dir():
            raise ConfigError(f"{option}: {path} is a folder; name a file in it, e.g. sqlite:///{path / 'db.sqlite'}")
        check_sqlite_file(path, option)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{option}: cannot make the folder {path.parent} for {shown!r} "
                              f"({err.strerror})") from None
        return url
    raise ConfigError(f"{option}: {EXPECTED}, got {shown!r}")


def open_engine(url: str, option: str) -> sa.engine.Engine:
    """An engine on a checked URL; connection errors (no server, wrong or missing password) in one line,
    without the password."""
    engine = sa.create_engine(database_url(url, option), pool_pre_ping=True)
    try:
        with engine.connect():
            pass
    except sa.exc.SQLAlchemyError as err:
        raise ConfigError(f"{option}: cannot open {hide_password(url)!r}: "
                          f"{scrub(str(err).splitlines()[0], url)}") from None
    return engine


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


def created_meanwhile(err: Exception) -> bool:
    """Whether a failed CREATE means that another worker created the same table (or its type) at the same
    moment, so that it exists now: PostgreSQL has no lock around it, and says so as a unique violation on
    its catalog or as "already exists"."""
    return isinstance(err, sa.exc.IntegrityError) or (isinstance(err, sa.exc.ProgrammingError)
                                                      and "already exists" in str(err))
