"""Auxiliary models: small models trained on a backbone model's features (PROBE), one per (model, kind).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aux_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("backbone_sha256", sa.String(64), nullable=False),
        sa.Column("params_json", sa.Text, nullable=False),
        sa.Column("metrics_json", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id", "kind"),
    )
    op.create_index("ix_aux_models_model_id", "aux_models", ["model_id"])


def downgrade() -> None:
    op.drop_table("aux_models")
