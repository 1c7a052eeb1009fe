"""datasets, environments and runs beside models (a kind per object, lineage and details per version);
evaluation jobs the hub runs itself

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 12:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every object a 0001 hub holds is a model
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="model"))
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("step_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("lineage", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("jobs")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("details")
        batch.drop_column("lineage")
        batch.drop_column("step_hash")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("kind")
