"""Training errors: each model's per-sample force and energy errors over its epochs (LTAU).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_errors",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("form", sa.String(20), nullable=False),
        sa.Column("n_epochs", sa.Integer, nullable=False),
        sa.Column("dtype", sa.String(10), nullable=False),
        sa.Column("structure_ids", sa.LargeBinary, nullable=False),
        sa.Column("atom_counts", sa.LargeBinary, nullable=False),
        sa.Column("forces_shape", sa.String(40), nullable=False),
        sa.Column("forces", sa.LargeBinary, nullable=False),
        sa.Column("energy_shape", sa.String(40), nullable=False),
        sa.Column("energy", sa.LargeBinary, nullable=False),
        sa.Column("forces_last", sa.LargeBinary, nullable=False),
        sa.Column("energy_last", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id"),
    )


def downgrade() -> None:
    op.drop_table("training_errors")
