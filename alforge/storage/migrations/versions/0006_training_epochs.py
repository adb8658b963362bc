"""Training epochs: per-epoch training loss and validation errors of each model.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_epochs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("epochs", sa.Integer, nullable=False),
        sa.Column("train_loss", sa.Float, nullable=False),
        sa.Column("valid_loss", sa.Float),
        sa.Column("valid_energy_rmse_per_atom", sa.Float),
        sa.Column("valid_forces_rmse", sa.Float),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.UniqueConstraint("model_id", "epoch"),
    )
    op.create_index("ix_training_epochs_model_id", "training_epochs", ["model_id"])


def downgrade() -> None:
    op.drop_table("training_epochs")
