"""Fresh SQLite tracking stores in milliseconds instead of seconds.

MLflow builds a new SQLite store by running every schema migration it has (about 2 to 4 s each,
and the suite makes well over a hundred stores). A test gets the same bytes by copying a store
that MLflow's own migrations built once per test process: the template. `install` builds it and
makes MLflow fill each new, empty SQLite store of this process from it (SQLite's backup API, into
the file MLflow has just opened); `fresh_sqlite_uri` copies it into a folder beforehand, for stores
that a subprocess (the CLI, `mlflow run`, `mlflow models serve`) opens first. Other databases
(PostgreSQL) migrate as MLflow does.

This leans on `mlflow.store.db.utils._initialize_tables(engine)`, MLflow's own hook for a store
with no tables; where a release renames it, nothing is patched, stores migrate slowly as before and
the run ends with a warning saying so.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import warnings
from pathlib import Path

_template: Path | None = None


def install(folder: Path) -> None:
    """Build the template in `folder` with MLflow's migrations and patch this process's store
    initialisation to copy it."""
    global _template
    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    import sqlalchemy

    original = getattr(db_utils, "_initialize_tables", None)
    if original is None:
        warnings.warn(
            "MLflow has no mlflow.store.db.utils._initialize_tables: each new SQLite store migrates (slow)",
            stacklevel=2,
        )
        return
    path = folder / "template.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        original(engine)
    finally:
        engine.dispose()

    def initialize_from_template(engine):
        if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
            return original(engine)
        raw = engine.raw_connection()
        try:
            with contextlib.closing(sqlite3.connect(path)) as template:
                template.backup(raw.driver_connection)
        finally:
            raw.close()

    db_utils._initialize_tables = initialize_from_template
    if getattr(registry_store, "_initialize_tables", None) is original:
        registry_store._initialize_tables = initialize_from_template
    _template = path


def fresh_sqlite_uri(db_path: Path) -> str:
    """The URI of a new SQLite store at `db_path`, its tables already made (copied from the
    template when there is one), so that a subprocess opening it first does not migrate it."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if _template is not None and not db_path.exists():
        shutil.copyfile(_template, db_path)
    return f"sqlite:///{db_path}"
