"""Initial schema: campaigns, iterations, structures, labels, models, features, selections.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_message", sa.Text),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "iterations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("explored", sa.Boolean, nullable=False),
        sa.Column("stop_reason", sa.Text),
        sa.Column("summary_json", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("campaign_id", "index"),
    )
    op.create_index("ix_iterations_campaign_id", "iterations", ["campaign_id"])
    op.create_table(
        "structures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("structures.id")),
        sa.Column("iteration_id", sa.Integer, sa.ForeignKey("iterations.id")),
        sa.Column("provenance_json", sa.Text),
        sa.Column("quarantined", sa.Boolean, nullable=False),
        sa.Column("n_atoms", sa.Integer, nullable=False),
        sa.Column("formula", sa.String(200), nullable=False),
        sa.Column("numbers", sa.LargeBinary, nullable=False),
        sa.Column("positions", sa.LargeBinary, nullable=False),
        sa.Column("cell", sa.LargeBinary, nullable=False),
        sa.Column("pbc", sa.String(3), nullable=False),
        sa.Column("info_json", sa.Text),
        sa.Column("arrays_npz", sa.LargeBinary),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("campaign_id", "hash"),
    )
    op.create_index("ix_structures_campaign_id", "structures", ["campaign_id"])
    op.create_index("ix_structures_role", "structures", ["role"])
    op.create_index("ix_structures_iteration_id", "structures", ["iteration_id"])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("structure_id", sa.Integer, sa.ForeignKey("structures.id", ondelete="CASCADE"), nullable=False),
        sa.Column("calculator", sa.String(200), nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("failure_class", sa.String(40)),
        sa.Column("error", sa.Text),
        sa.Column("output_tail", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("energy", sa.Float),
        sa.Column("forces", sa.LargeBinary),
        sa.Column("stress", sa.LargeBinary),
        sa.Column("wall_time", sa.Float),
        sa.Column("host", sa.String(200)),
        sa.Column("code_version", sa.String(200)),
        sa.Column("metadata_json", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("structure_id", "calculator", "params_hash"),
    )
    op.create_index("ix_labels_structure_id", "labels", ["structure_id"])
    op.create_index("ix_labels_status", "labels", ["status"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("iteration_id", sa.Integer, sa.ForeignKey("iterations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("parent_model_id", sa.Integer, sa.ForeignKey("models.id")),
        sa.Column("train_ids", sa.LargeBinary, nullable=False),
        sa.Column("metrics_json", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("campaign_id", "iteration_id"),
    )
    op.create_index("ix_models_campaign_id", "models", ["campaign_id"])
    op.create_table(
        "features",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("structure_id", sa.Integer, sa.ForeignKey("structures.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("dtype", sa.String(10), nullable=False),
        sa.Column("shape", sa.String(40), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("structure_id", "model_id", "kind"),
    )
    op.create_index("ix_features_structure_id", "features", ["structure_id"])
    op.create_index("ix_features_model_id", "features", ["model_id"])
    op.create_table(
        "selections",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("iteration_id", sa.Integer, sa.ForeignKey("iterations.id", ondelete="CASCADE"), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("selector", sa.String(80), nullable=False),
        sa.Column("params_json", sa.Text, nullable=False),
        sa.Column("candidate_ids", sa.LargeBinary, nullable=False),
        sa.Column("picked_ids", sa.LargeBinary, nullable=False),
        sa.Column("scores", sa.LargeBinary, nullable=False),
        sa.Column("info_json", sa.Text),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("selections", "features", "models", "labels", "structures", "iterations", "campaigns"):
        op.drop_table(table)
