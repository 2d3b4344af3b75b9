"""stackml control plane: API, domain model, persistence and backends."""

__version__ = "0.1.0"
