"""Backends: contracts in interfaces.py, implementations chosen by configuration."""
