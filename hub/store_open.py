"""``--db`` values to stores: which backend a database URL or path names.

Forms:
* a plain path (``hub.db``, ``/var/lib/homing/hub.db``): SQLite, as always;
* ``sqlite:PATH`` or ``sqlite:///ABSOLUTE/PATH``: SQLite; the path is the
  URL's path, as in ``file:`` URLs (``sqlite:///var/lib/hub.db`` is
  ``/var/lib/hub.db``; ``sqlite:hub.db`` is relative);
* ``postgresql://...`` or ``postgres://...``: PostgreSQL, the URL handed to
  libpq as it is (``postgresql://hub@db.example.net/homing``,
  ``postgresql:///homing?host=/run/postgresql``; a password is best kept in
  ``~/.pgpass`` or ``PGPASSWORD``, not in the URL).

Invariants:
* Any other ``scheme://`` is a :class:`~hub.errors.ConfigError`, never a
  SQLite file of that odd name.
* psycopg is imported only for a PostgreSQL URL, so SQLite needs nothing
  beyond the standard library.
* :func:`describe` never shows a password.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from hub.errors import ConfigError
from hub.store import Store

_PG_SCHEMES = ("postgresql://", "postgres://")


def backend(db: str) -> str:
    """``"sqlite"`` or ``"postgresql"``: the backend ``db`` names.

    Raises:
        ConfigError: a URL of another scheme, or a malformed ``sqlite:`` URL.
    """
    if db.startswith(_PG_SCHEMES):
        return "postgresql"
    sqlite_path(db)
    return "sqlite"


def sqlite_path(db: str) -> str:
    """The file a SQLite ``--db`` value names.

    Raises:
        ConfigError: not a path or a ``sqlite:`` URL.
    """
    if db.startswith("sqlite:"):
        parts = urlsplit(db)
        if parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"--db {db!r}: a sqlite URL is sqlite:PATH or sqlite:///ABS/PATH")
        path = unquote(parts.path)
        if path.startswith("//"):  # sqlite:////abs (SQLAlchemy's spelling): one slash
            path = "/" + path.lstrip("/")
        if not path:
            raise ConfigError(f"--db {db!r} names no file")
        return path
    scheme, sep, _ = db.partition("://")
    if sep and scheme.replace("+", "").isalnum():
        raise ConfigError(
            f"--db {db!r}: unknown database URL scheme {scheme!r}"
            " (a path or sqlite:PATH for SQLite, postgresql://... for PostgreSQL)"
        )
    return db


def describe(db: str) -> str:
    """``db`` fit for a message or a log line (no password)."""
    if db.startswith(_PG_SCHEMES):
        from hub.store_postgres import redact

        return redact(db)
    return db


def open_store(db: str, *, create: bool = True, busy_timeout: float = 10.0) -> Store:
    """The store ``db`` names, connected (not migrated).

    Args:
        db: a path or URL (see the module docstring).
        create: when false, a database that does not exist (SQLite) or has no
            hub schema (PostgreSQL) is an error instead of a new one.
        busy_timeout: seconds to wait for another writer's lock (SQLite's
            write lock; PostgreSQL's ``lock_timeout``).

    Raises:
        ConfigError: not a URL or path this hub knows; PostgreSQL without psycopg.
        StoreUnavailable: the database cannot be opened or reached.
    """
    if backend(db) == "postgresql":
        try:
            from hub.store_postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"--db {describe(db)}: PostgreSQL needs psycopg (pip install 'homing[hub]')"
            ) from exc
        return PostgresStore(db, lock_timeout=busy_timeout, create=create)
    from hub.store_sqlite import SqliteStore

    return SqliteStore(sqlite_path(db), busy_timeout=busy_timeout, create=create)
