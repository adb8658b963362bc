"""Model Hessians: the loss-consistent last-layer H of a model, computed once per (model, form).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_hessians",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("form", sa.String(40), nullable=False),
        sa.Column("dtype", sa.String(10), nullable=False),
        sa.Column("shape", sa.String(40), nullable=False),
        sa.Column("matrix", sa.LargeBinary, nullable=False),
        sa.Column("regularizer", sa.Float, nullable=False),
        sa.Column("regularizer_method", sa.Text, nullable=False),
        sa.Column("weights_json", sa.Text, nullable=False),
        sa.Column("n_structures", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id", "form"),
    )
    op.create_index("ix_model_hessians_model_id", "model_hessians", ["model_id"])


def downgrade() -> None:
    op.drop_table("model_hessians")
