"""pytest-bridge: bridge a Kubernetes service into a pytest session."""
