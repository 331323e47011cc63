#!/usr/bin/env bash
# The main job: bring the embedded cluster up (unless KUBECONFIG names one) and run the demo
# suite against the sample app.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"
kubeconfig_line=$(python -m e2e.cluster up | tail -n 1)
export "${kubeconfig_line?}"
export PYTEST_BRIDGE_REQUIRE_CLUSTER=1
pytest demo -p no:cacheprovider "$@"
