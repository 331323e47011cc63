"""Routing manager of pytest-bridge."""
