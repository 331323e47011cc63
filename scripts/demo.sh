#!/usr/bin/env bash
# The main job: bring the embedded cluster up (unless KUBECONFIG names one) with the sample
# app, and run the demo suite with `orders` bridged to this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"
kubeconfig_line=$(python -m e2e.cluster up | tail -n 1)
export "${kubeconfig_line?}"
# The tunnel rides `kubectl port-forward` when a kubectl is found (--bridge-transport=auto).
if kubectl_bin=$(python -m e2e.cluster kubectl); then export PYTEST_BRIDGE_KUBECTL="$kubectl_bin"; fi
pytest demo -p no:cacheprovider --bridge-service=orders --bridge-namespace=bridge-demo "$@"
