"""Restoring a workload someone changed while it was bridged: the three-way merge (pytest_bridge_agent.merge)."""

from __future__ import annotations

import copy
from typing import Any

from k8s_samples import orders_deployment, orders_pod, orders_replicaset, orders_service
from pytest_bridge_agent.merge import merge_restore, refused_as_invalid
from pytest_bridge_agent.runtime import Code

from pytest_bridge.core.jsonpatch import apply_patch
from pytest_bridge.core.patch import AgentSpec, strip_server_fields, workload_patches
from pytest_bridge.core.plan import make_plan

AGENT = AgentSpec(image="python:3.11-slim", session="s-1a2b", token_sha256="01" * 32, code=Code("cm-1", "d" * 64))


def bridged() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(original, bridged with a resourceVersion, forward patch) for the sample Deployment."""
    deployment = orders_deployment()
    plan = make_plan(orders_service(), [orders_pod()], [orders_replicaset(), deployment])
    patches = workload_patches(deployment, plan, AGENT)
    now = apply_patch(deployment, patches.forward)
    now["metadata"]["resourceVersion"] = "42"
    return strip_server_fields(deployment), now, patches.forward


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_untouched_bridge_merges_back_to_exactly_the_original() -> None:
    original, now, forward = bridged()
    merged = merge_restore(original, now, forward)
    assert merged.kept == []
    assert merged.patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "42"}
    restored = apply_patch(now, merged.patch)
    for key in ("spec",):
        assert restored[key] == original[key]
    assert restored["metadata"].get("labels") == original["metadata"].get("labels")
    server_set = {"deployment.kubernetes.io/revision"}  # not in the record (stripped), not ours to touch
    annotations = {k: v for k, v in restored["metadata"]["annotations"].items() if k not in server_set}
    assert annotations == original["metadata"].get("annotations")


def test_set_image_during_the_session_keeps_their_image_on_the_original_container() -> None:
    original, now, forward = bridged()
    container(now)["image"] = "orders:v2"  # kubectl set image deploy/orders orders=orders:v2
    merged = merge_restore(original, now, forward)
    restored = apply_patch(now, merged.patch)
    assert container(restored) == {**container(original), "image": "orders:v2"}
    assert merged.kept == ["/spec/template/spec/containers/0/image"]


def test_scale_during_the_session_keeps_their_replicas() -> None:
    original, now, forward = bridged()
    now["spec"]["replicas"] = 4
    merged = merge_restore(original, now, forward)
    restored = apply_patch(now, merged.patch)
    assert restored["spec"]["replicas"] == 4 and "/spec/replicas" in merged.kept
    assert container(restored) == container(original)


def test_apply_of_the_original_manifest_during_the_session_ends_as_the_original() -> None:
    """kubectl apply puts back the fields of its manifest; our marks and the agent's extra fields stay."""
    original, now, forward = bridged()
    for key, value in container(original).items():
        container(now)[key] = copy.deepcopy(value)
    merged = merge_restore(original, now, forward)
    restored = apply_patch(now, merged.patch)
    assert restored["spec"]["template"] == original["spec"]["template"]


def test_a_volume_someone_added_stays_and_ours_goes() -> None:
    original, now, forward = bridged()
    theirs = {"name": "cache", "emptyDir": {}}
    now["spec"]["template"]["spec"].setdefault("volumes", []).insert(0, theirs)
    restored = apply_patch(now, merge_restore(original, now, forward).patch)
    assert restored["spec"]["template"]["spec"]["volumes"] == [
        theirs,
        *original["spec"]["template"]["spec"].get("volumes", []),
    ]


def test_invalid_is_told_from_a_failed_test() -> None:
    assert not refused_as_invalid({"code": 422, "reason": "Invalid", "details": {}})
    assert refused_as_invalid({"code": 422, "reason": "Invalid", "details": {"causes": [{"field": "spec"}]}})


def test_set_env_during_the_session_keeps_their_variable_and_drops_the_agents() -> None:
    original, now, forward = bridged()
    container(now)["env"].append({"name": "FEATURE", "value": "on"})  # kubectl set env deploy/orders FEATURE=on
    merged = merge_restore(original, now, forward)
    restored = apply_patch(now, merged.patch)
    env = [*container(original)["env"], {"name": "FEATURE", "value": "on"}]
    assert container(restored) == {**container(original), "env": env}
    assert merged.kept == ["/spec/template/spec/containers/0/env[FEATURE]"]


def test_a_record_whose_original_lost_a_map_to_stripping_still_merges() -> None:
    """strip_server_fields drops server-set annotations; the forward patch may add into that map."""
    original, now, forward = bridged()
    original["metadata"].pop("annotations", None)
    restored = apply_patch(now, merge_restore(original, now, forward).patch)
    assert "pytest-bridge.io/session" not in restored["metadata"].get("annotations", {})


def test_our_volume_goes_even_with_the_servers_defaults_filled_in() -> None:
    original, now, forward = bridged()
    volumes = now["spec"]["template"]["spec"]["volumes"]
    volumes[-1] = {**volumes[-1], "configMap": {**volumes[-1].get("configMap", {}), "defaultMode": 420}}
    restored = apply_patch(now, merge_restore(original, now, forward).patch)
    assert restored["spec"]["template"]["spec"].get("volumes") == original["spec"]["template"]["spec"].get("volumes")


def test_fields_the_server_filled_in_do_not_count_as_someone_elses_change() -> None:
    """The API server defaults a probe's timeoutSeconds etc.: the agent's probe is still ours."""
    original, now, forward = bridged()
    probe = container(now).get("readinessProbe")
    if probe is None:
        container(now)["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 47101}}
        forward = [*forward]  # the sample's agent has a probe; keep the test meaningful if it ever has none
    else:
        probe.update({"timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3})
    container(now)["image"] = "orders:v2"
    restored = apply_patch(now, merge_restore(original, now, forward).patch)
    assert container(restored).get("readinessProbe") == container(original).get("readinessProbe")
