"""Alembic's entry point for the hub's migrations (run by `atomlab hub migrate`)."""

from alembic import context
from sqlalchemy import create_engine

from atomlab.hub.db import Base

config = context.config


def run() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        # batch mode lets later migrations alter tables on SQLite too
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
