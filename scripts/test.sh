#!/usr/bin/env bash
# Run every test tier: unit and local integration, then end-to-end on a real cluster
# (the embedded one unless KUBECONFIG names another). Installs and starts what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== lint" >&2
ruff check . && ruff format --check . && mypy && lint-imports --no-cache

echo "== unit + integration" >&2
pytest tests -p no:cacheprovider "$@"

echo "== cluster" >&2
kubeconfig_line=$(python -m e2e.cluster up | tail -n 1)
export "${kubeconfig_line?}"
# The tunnel rides `kubectl port-forward` when a kubectl is found (--bridge-transport=auto).
if kubectl_bin=$(python -m e2e.cluster kubectl); then export PYTEST_BRIDGE_KUBECTL="$kubectl_bin"; fi
export PYTEST_BRIDGE_REQUIRE_CLUSTER=1

echo "== end-to-end" >&2
pytest e2e -p no:cacheprovider "$@"

echo "== packaging: the wheel in a fresh virtualenv outside the repo, a bridged suite (python -m e2e.packaging)" >&2
# Own namespace (bridge-packaging); downloads are kept in a wheelhouse, so a rerun takes ~15 s.
python -m e2e.packaging

echo "== demo suite (the main job), bridged" >&2
pytest demo -p no:cacheprovider --bridge-service=orders --bridge-namespace=bridge-demo

echo "== benchmarks, smoke (python -m bench --quick)" >&2
# Same cluster, own namespace (bridge-bench). Fails on a lost byte or a failed connection
# through the bridge, never on a missed speed target; BENCHMARKS.md has the full run.
python -m bench --quick
