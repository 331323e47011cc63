# pytest-bridge routing image: the routers' data plane, for --bridge-routing-image. It is the
# stock nginx image under your registry's name, labelled: a router gets its nginx configuration
# at run time from its control process (which runs on the agent image), so nothing is added.
# `pytest-bridge images build|push|load` builds it next to the agent image, so one registry
# serves everything a session runs.
ARG NGINX_IMAGE=nginx:1.28.0
FROM ${NGINX_IMAGE}
ARG NGINX_IMAGE
ARG PYTEST_BRIDGE_VERSION=unknown

LABEL org.opencontainers.image.title="pytest-bridge-routing" \
      org.opencontainers.image.description="pytest-bridge router data plane (nginx)" \
      org.opencontainers.image.version="${PYTEST_BRIDGE_VERSION}" \
      org.opencontainers.image.base.name="${NGINX_IMAGE}" \
      io.pytest-bridge.version="${PYTEST_BRIDGE_VERSION}"
