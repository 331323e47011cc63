"""In-cluster agent of pytest-bridge (stdlib only)."""
