"""Persistence: SQLAlchemy Core tables, the engine wrapper, Alembic migrations."""
