"""Committee members: extra models of an iteration trained with other seeds (query by committee).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "committee_members",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("metrics_json", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id", "member"),
    )
    op.create_index("ix_committee_members_model_id", "committee_members", ["model_id"])


def downgrade() -> None:
    op.drop_table("committee_members")
