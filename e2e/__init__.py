"""End-to-end tier: the real-cluster harness (`e2e.cluster`) and the suites that run against it."""
