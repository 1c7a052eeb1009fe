"""the lineage index: what each version's lineage names (step hashes, inputs, base model, environments),
one row per name, so lineage is looked up instead of found by scanning every version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 16:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from atomlab.hub.db import index_lineage

    op.create_table(
        "lineage_keys",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=1000), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"]),
        sa.PrimaryKeyConstraint("version_id", "relation", "key"),
    )
    op.create_index("ix_lineage_keys_relation_key", "lineage_keys", ["relation", "key"])
    # the versions a hub already holds: their index, from the columns publish derives it from
    index_lineage(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_lineage_keys_relation_key", table_name="lineage_keys")
    op.drop_table("lineage_keys")
