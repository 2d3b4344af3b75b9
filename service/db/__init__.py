"""Persistence: SQLAlchemy models, the session factory, repositories and Alembic migrations."""
