"""One campaign, one owner: campaign leases, label claims, model file hashes, config history.

Existing campaigns get their stored config as version 1 of the history (labeller identity unknown:
it is filled in by the next run). Rows written before this revision have no claim and no hash.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "campaign_leases",
        sa.Column(
            "campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("owner", sa.String(36), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("acquired_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_table(
        "campaign_configs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("changes_json", sa.Text),
        sa.Column("calculator", sa.String(200)),
        sa.Column("params_hash", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("campaign_id", "version"),
    )
    op.create_index("ix_campaign_configs_campaign_id", "campaign_configs", ["campaign_id"])
    op.execute(
        "INSERT INTO campaign_configs (campaign_id, version, config_json, created_at) "
        "SELECT id, 1, config_json, created_at FROM campaigns"
    )
    op.add_column("labels", sa.Column("claim_owner", sa.String(36)))
    op.add_column("labels", sa.Column("claim_expires_at", TS))
    op.create_index("ix_labels_claim_owner", "labels", ["claim_owner"])
    op.add_column("models", sa.Column("sha256", sa.String(64)))
    op.add_column("committee_members", sa.Column("sha256", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("committee_members") as batch:
        batch.drop_column("sha256")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("sha256")
    op.drop_index("ix_labels_claim_owner", "labels")
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("claim_expires_at")
        batch.drop_column("claim_owner")
    op.drop_table("campaign_configs")
    op.drop_table("campaign_leases")
