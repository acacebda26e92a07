"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    
    op.create_table('apps',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('binaries', sa.JSON(), nullable=False),
    sa.Column('default_stdin', sa.String(length=36), nullable=True),
    sa.Column('default_dirin', sa.String(length=36), nullable=True),
    sa.Column('base_dirin', sa.String(length=36), nullable=True),
    sa.Column('env', sa.JSON(), nullable=False),
    sa.Column('packages', sa.JSON(), nullable=False),
    sa.Column('min_memory', sa.Integer(), nullable=False),
    sa.Column('min_cpuspeed', sa.Integer(), nullable=False),
    sa.Column('min_disk', sa.Integer(), nullable=False),
    sa.Column('image', sa.String(length=36), nullable=True),
    sa.PrimaryKeyConstraint('uid'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('apps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_apps_owner'), ['owner'], unique=False)

    op.create_table('datas',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('links', sa.Integer(), nullable=False),
    sa.Column('work', sa.String(length=36), nullable=True),
    sa.PrimaryKeyConstraint('uid')
    )
    with op.batch_alter_table('datas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datas_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_datas_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_datas_work'), ['work'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('time', sa.Float(), nullable=False),
    sa.Column('actor', sa.String(length=36), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object', sa.String(length=36), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=True),
    sa.Column('target', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_object'), ['object'], unique=False)

    op.create_table('groups',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('label', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('uid')
    )
    with op.batch_alter_table('groups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_groups_owner'), ['owner'], unique=False)

    op.create_table('hosts',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('os', sa.String(length=32), nullable=False),
    sa.Column('cpu', sa.String(length=32), nullable=False),
    sa.Column('cpuspeed', sa.Integer(), nullable=False),
    sa.Column('cores', sa.Integer(), nullable=False),
    sa.Column('memory', sa.Integer(), nullable=False),
    sa.Column('disk', sa.Integer(), nullable=False),
    sa.Column('java', sa.Boolean(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=True),
    sa.Column('apptypes', sa.JSON(), nullable=False),
    sa.Column('packages', sa.JSON(), nullable=False),
    sa.Column('sharedatas', sa.JSON(), nullable=False),
    sa.Column('project', sa.String(length=128), nullable=True),
    sa.Column('incoming', sa.Boolean(), nullable=False),
    sa.Column('pool', sa.Integer(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('last_alive', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('uid')
    )
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hosts_owner'), ['owner'], unique=False)

    op.create_table('sessions',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('label', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('uid')
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sessions_owner'), ['owner'], unique=False)

    op.create_table('tasks',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('work', sa.String(length=36), nullable=False),
    sa.Column('host', sa.String(length=36), nullable=False),
    sa.Column('trial', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started', sa.Float(), nullable=False),
    sa.Column('last_alive', sa.Float(), nullable=False),
    sa.Column('ended', sa.Float(), nullable=True),
    sa.Column('return_code', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('result_sha256', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('uid')
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tasks_host'), ['host'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_owner'), ['owner'], unique=False)
        batch_op.create_index('ix_tasks_status_alive', ['status', 'last_alive'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_work'), ['work'], unique=False)

    op.create_table('usergroups',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('uid'),
    sa.UniqueConstraint('label')
    )
    with op.batch_alter_table('usergroups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usergroups_owner'), ['owner'], unique=False)

    op.create_table('users',
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=True),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('login', sa.String(length=128), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=True),
    sa.Column('level', sa.String(length=32), nullable=False),
    sa.Column('usergroup', sa.String(length=36), nullable=True),
    sa.Column('email', sa.String(length=255), nullable=True),
    sa.Column('x509_dn', sa.String(length=512), nullable=True),
    sa.Column('oidc_subject', sa.String(length=512), nullable=True),
    sa.PrimaryKeyConstraint('uid'),
    sa.UniqueConstraint('login'),
    sa.UniqueConstraint('x509_dn')
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_users_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_users_usergroup'), ['usergroup'], unique=False)

    op.create_table('works',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('uid', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=36), nullable=False),
    sa.Column('access_rights', sa.Integer(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('modified', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('app', sa.String(length=36), nullable=False),
    sa.Column('args', sa.Text(), nullable=True),
    sa.Column('env', sa.JSON(), nullable=False),
    sa.Column('stdin', sa.String(length=36), nullable=True),
    sa.Column('dirin', sa.String(length=36), nullable=True),
    sa.Column('label', sa.String(length=255), nullable=True),
    sa.Column('grp', sa.String(length=36), nullable=True),
    sa.Column('session', sa.String(length=36), nullable=True),
    sa.Column('expected_host', sa.String(length=255), nullable=True),
    sa.Column('min_memory', sa.Integer(), nullable=False),
    sa.Column('min_cpuspeed', sa.Integer(), nullable=False),
    sa.Column('min_disk', sa.Integer(), nullable=False),
    sa.Column('wallclock', sa.Integer(), nullable=True),
    sa.Column('max_retries', sa.Integer(), nullable=False),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('replica_of', sa.String(length=36), nullable=True),
    sa.Column('requirements', sa.Text(), nullable=True),
    sa.Column('rank', sa.Text(), nullable=True),
    sa.Column('listen_ports', sa.String(length=255), nullable=True),
    sa.Column('forward_addresses', sa.Text(), nullable=True),
    sa.Column('result', sa.String(length=36), nullable=True),
    sa.Column('return_code', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('host', sa.String(length=36), nullable=True),
    sa.Column('task', sa.String(length=36), nullable=True),
    sa.Column('pending_since', sa.Float(), nullable=True),
    sa.Column('started', sa.Float(), nullable=True),
    sa.Column('completed', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('uid')
    )
    with op.batch_alter_table('works', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_works_app'), ['app'], unique=False)
        batch_op.create_index(batch_op.f('ix_works_grp'), ['grp'], unique=False)
        batch_op.create_index(batch_op.f('ix_works_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_works_replica_of'), ['replica_of'], unique=False)
        batch_op.create_index(batch_op.f('ix_works_session'), ['session'], unique=False)
        batch_op.create_index('ix_works_status_id', ['status', 'id'], unique=False)

    


def downgrade() -> None:
    
    with op.batch_alter_table('works', schema=None) as batch_op:
        batch_op.drop_index('ix_works_status_id')
        batch_op.drop_index(batch_op.f('ix_works_session'))
        batch_op.drop_index(batch_op.f('ix_works_replica_of'))
        batch_op.drop_index(batch_op.f('ix_works_owner'))
        batch_op.drop_index(batch_op.f('ix_works_grp'))
        batch_op.drop_index(batch_op.f('ix_works_app'))

    op.drop_table('works')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_users_usergroup'))
        batch_op.drop_index(batch_op.f('ix_users_owner'))

    op.drop_table('users')
    with op.batch_alter_table('usergroups', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usergroups_owner'))

    op.drop_table('usergroups')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tasks_work'))
        batch_op.drop_index('ix_tasks_status_alive')
        batch_op.drop_index(batch_op.f('ix_tasks_owner'))
        batch_op.drop_index(batch_op.f('ix_tasks_host'))

    op.drop_table('tasks')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sessions_owner'))

    op.drop_table('sessions')
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hosts_owner'))

    op.drop_table('hosts')
    with op.batch_alter_table('groups', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_groups_owner'))

    op.drop_table('groups')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_object'))

    op.drop_table('events')
    with op.batch_alter_table('datas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datas_work'))
        batch_op.drop_index(batch_op.f('ix_datas_sha256'))
        batch_op.drop_index(batch_op.f('ix_datas_owner'))

    op.drop_table('datas')
    with op.batch_alter_table('apps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apps_owner'))

    op.drop_table('apps')
    
