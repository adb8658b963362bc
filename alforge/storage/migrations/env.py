"""Alembic environment: always driven programmatically by :func:`alforge.storage.schema.upgrade`,
which hands over an open connection (no alembic.ini needed)."""

from alembic import context

from alforge.storage.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
)
with context.begin_transaction():
    context.run_migrations()
