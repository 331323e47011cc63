"""pytest plugin entry point (wiring only)."""
