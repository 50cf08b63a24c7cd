"""Alembic environment for Tether's tables (own version table, own metadata)."""

from __future__ import annotations

import contextlib
from typing import Any

from alembic import context

from tether.plane.db import TetherDBManager

config = context.config
target_metadata = TetherDBManager.metadata
# RunDBManager reads this file and insists every configure() names version_table.
version_table = TetherDBManager.version_table_name


def include_object(_obj: Any, name: str | None, type_: str, *_args: Any) -> bool:
    return not (type_ == "table" and name not in target_metadata.tables)


def run_migrations_offline() -> None:
    from airflow import settings

    context.configure(
        url=settings.SQL_ALCHEMY_CONN,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        version_table=version_table,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with contextlib.ExitStack() as stack:
        connection = config.attributes.get("connection")
        engine: Any
        if connection is None:
            from sqlalchemy import create_engine

            url = config.get_main_option("sqlalchemy.url")
            if url:
                engine = create_engine(url)
                stack.callback(engine.dispose)
            else:
                from airflow import settings

                engine = settings.engine
            connection = stack.enter_context(engine.connect())
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            version_table=version_table,
            include_object=include_object,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
