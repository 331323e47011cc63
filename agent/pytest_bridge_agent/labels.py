"""Every label and annotation name pytest-bridge puts on cluster objects, in one place.

The plugin, the agent, the guard and the routing manager all read and write these; the
in-cluster code cannot import the plugin (it runs from the bundle on stock images), so the
names live here, in the agent package that every side already ships or imports. Stdlib only;
no I/O.
"""

from __future__ import annotations

__all__ = [
    "CODE_LABEL",
    "COMPONENT_LABEL",
    "CONTAINER_ANNOTATION",
    "GENERATION_ANNOTATION",
    "INSTALLED_LABEL",
    "MANAGED_BY_LABEL",
    "MANAGED_BY_VALUE",
    "OBSERVE_ANNOTATION",
    "ORIGINAL_SELECTOR_ANNOTATION",
    "POOL_LABEL",
    "PREFIX",
    "ROLE_LABEL",
    "ROUTER_LABEL",
    "ROUTE_LABEL",
    "ROUTE_ON_HEADER_ANNOTATION",
    "ROUTE_SERVICE_LABEL",
    "RUNTIME_ANNOTATION",
    "SESSION_ANNOTATION",
    "SESSION_LABEL",
    "SOURCE_ANNOTATION",
    "VERSION_ANNOTATION",
]

PREFIX = "pytest-bridge.io/"

# Every object the plugin or the routing manager creates
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "pytest-bridge"

# A bridge session (plugin, agent, guard)
SESSION_LABEL = PREFIX + "session"  # every object a session creates, and the workload it patched
SESSION_ANNOTATION = PREFIX + "session"  # on the patched workload: which session holds it
CONTAINER_ANNOTATION = PREFIX + "container"  # on the patched workload: the bridged container
ROLE_LABEL = PREFIX + "role"  # "guard" on the guard's pod (it carries the session label too)
INSTALLED_LABEL = PREFIX + "installed"  # RBAC objects an admin installed once (`pytest-bridge rbac`)

# The code bundle (ConfigMap named by its digest)
CODE_LABEL = PREFIX + "code"
VERSION_ANNOTATION = PREFIX + "version"

# Isolated routes and the routing manager
COMPONENT_LABEL = PREFIX + "component"  # "route", "router", "routing-manager"
ROUTE_LABEL = PREFIX + "route"
ROUTE_SERVICE_LABEL = PREFIX + "route-service"
POOL_LABEL = PREFIX + "pool"  # a warm route pod not yet claimed
ROUTER_LABEL = PREFIX + "router"
ORIGINAL_SELECTOR_ANNOTATION = PREFIX + "original-selector"  # a Service switched to its router keeps its own here
ROUTE_ON_HEADER_ANNOTATION = PREFIX + "route-on-header"
OBSERVE_ANNOTATION = PREFIX + "observe"
GENERATION_ANNOTATION = PREFIX + "generation"  # the router config's generation
SOURCE_ANNOTATION = PREFIX + "source"
RUNTIME_ANNOTATION = PREFIX + "runtime"  # on the manager: which code and images it runs (RoutingRuntime.key)
