# pytest-bridge agent image: a stock Python image plus pytest-bridge's in-cluster code, for
# --bridge-code=image. `pytest-bridge images build|push|load` writes the code (pytest-bridge.pyz,
# the zipapp the plugin otherwise ships in a ConfigMap at connect) next to this file and passes
# the build args; by hand:
#   docker build --build-arg PYTEST_BRIDGE_VERSION=... --build-arg PYTEST_BRIDGE_CODE=... -t IMAGE CONTEXT
# The agent, the restore guard, the routing manager and the routers' control process all run
# on it: every pod names its own command (python3 -I /opt/pytest-bridge/pytest-bridge.pyz ROLE).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG PYTEST_BRIDGE_VERSION=unknown
ARG PYTEST_BRIDGE_CODE=unknown

# Root-owned and world-readable (0644 in the context): any uid a pod runs as can read it.
COPY pytest-bridge.pyz /opt/pytest-bridge/pytest-bridge.pyz

# No ENV on purpose: the agent reports its own environment as the bridged container's.
# Fail the build, not the first pod: the base has a python3 on PATH that runs the code.
RUN python3 -I /opt/pytest-bridge/pytest-bridge.pyz agent --help > /dev/null

LABEL org.opencontainers.image.title="pytest-bridge-agent" \
      org.opencontainers.image.description="pytest-bridge in-cluster code (agent, guard, routing manager, router control)" \
      org.opencontainers.image.version="${PYTEST_BRIDGE_VERSION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      io.pytest-bridge.version="${PYTEST_BRIDGE_VERSION}" \
      io.pytest-bridge.code="${PYTEST_BRIDGE_CODE}"

# For humans (`docker run --rm IMAGE guard --help`); pods set their own command.
ENTRYPOINT ["python3", "-I", "/opt/pytest-bridge/pytest-bridge.pyz"]
CMD ["agent", "--help"]
