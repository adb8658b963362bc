"""Label attempts: one row per labelling attempt (retry history, failure classes, decisions).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("label_id", sa.Integer, sa.ForeignKey("labels.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("failure_class", sa.String(40)),
        sa.Column("message", sa.Text),
        sa.Column("output_tail", sa.Text),
        sa.Column("wall_time", sa.Float),
        sa.Column("kwargs_json", sa.Text),
        sa.Column("metadata_json", sa.Text),
        sa.Column("decision", sa.String(20)),
        sa.Column("decision_reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_label_attempts_label_id", "label_attempts", ["label_id"])


def downgrade() -> None:
    op.drop_table("label_attempts")
