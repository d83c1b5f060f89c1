"""Initial schema: registry, packages, devices, deployments and device events.

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 13:29:00.048154
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('enrollment_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('max_uses', sa.Integer(), nullable=False),
    sa.Column('uses', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('model_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('framework', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('signature', sa.JSON(), nullable=False),
    sa.Column('model_file', sa.String(), nullable=False),
    sa.Column('sample_input', sa.String(), nullable=False),
    sa.Column('expected_output', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_model_version_name_version')
    )
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_version_name'), ['name'], unique=False)

    op.create_table('device',
    sa.Column('id', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('device_class', sa.String(length=63), nullable=False),
    sa.Column('password_hash', sa.String(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=True),
    sa.Column('enrolled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('desired_counter', sa.Integer(), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reported_state', sa.JSON(), nullable=True),
    sa.Column('evt_acked_seq', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['token_id'], ['enrollment_token.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('model_file',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_version_id', 'path', name='uq_model_file_path')
    )
    with op.batch_alter_table('model_file', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_file_model_version_id'), ['model_version_id'], unique=False)

    op.create_table('package',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('chunk_bytes', sa.Integer(), nullable=False),
    sa.Column('chunks', sa.JSON(), nullable=False),
    sa.Column('release_keyid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], ),
    sa.PrimaryKeyConstraint('digest'),
    sa.UniqueConstraint('model_version_id')
    )
    with op.batch_alter_table('package', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_package_model'), ['model'], unique=False)

    op.create_table('deployment',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('model', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('package_digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['package_digest'], ['package.digest'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_model'), ['model'], unique=False)

    op.create_table('device_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=63), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('deployment_id', sa.String(length=40), nullable=False),
    sa.Column('model', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('step', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('detail', sa.String(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'seq', name='uq_device_event_seq')
    )
    with op.batch_alter_table('device_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_event_device_id'), ['device_id'], unique=False)

    op.create_table('deployment_device',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deployment_id', sa.String(length=40), nullable=False),
    sa.Column('device_id', sa.String(length=63), nullable=False),
    sa.Column('step', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('detail', sa.String(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployment.id'], ),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('deployment_id', 'device_id', name='uq_deployment_device')
    )
    with op.batch_alter_table('deployment_device', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_device_deployment_id'), ['deployment_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployment_device_device_id'), ['device_id'], unique=False)

    op.create_table('device_desired',
    sa.Column('device_id', sa.String(length=63), nullable=False),
    sa.Column('model', sa.String(length=63), nullable=False),
    sa.Column('package_digest', sa.String(length=64), nullable=False),
    sa.Column('deployment_id', sa.String(length=40), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployment.id'], ),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['package_digest'], ['package.digest'], ),
    sa.PrimaryKeyConstraint('device_id', 'model')
    )


def downgrade() -> None:
    op.drop_table('device_desired')
    with op.batch_alter_table('deployment_device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_device_device_id'))
        batch_op.drop_index(batch_op.f('ix_deployment_device_deployment_id'))

    op.drop_table('deployment_device')
    with op.batch_alter_table('device_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_event_device_id'))

    op.drop_table('device_event')
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_model'))

    op.drop_table('deployment')
    with op.batch_alter_table('package', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_package_model'))

    op.drop_table('package')
    with op.batch_alter_table('model_file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_file_model_version_id'))

    op.drop_table('model_file')
    op.drop_table('device')
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_version_name'))

    op.drop_table('model_version')
    op.drop_table('enrollment_token')
