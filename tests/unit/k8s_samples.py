"""Realistic Kubernetes objects (API JSON shape) for the pure-logic unit tests.

Every function returns a fresh deep structure, so tests may modify what they get.
"""

from __future__ import annotations

from typing import Any

NS = "shop"
DEPLOY_UID = "0f0e7c1a-1111-4c55-9d8e-aaaaaaaaaaaa"
RS_UID = "0f0e7c1a-2222-4c55-9d8e-bbbbbbbbbbbb"
STS_UID = "0f0e7c1a-3333-4c55-9d8e-cccccccccccc"

Obj = dict[str, Any]


def app_container() -> Obj:
    return {
        "name": "app",
        "image": "registry.example.com/shop/orders:1.4.2",
        "imagePullPolicy": "Always",
        "command": ["/app/orders"],
        "args": ["--listen=:8080", "--grpc=:9090"],
        "workingDir": "/app",
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
        ],
        "env": [
            {"name": "LOG_LEVEL", "value": "debug"},
            {"name": "INVENTORY_URL", "value": "http://inventory:80"},
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "orders-db", "key": "password"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "orders-config"}}],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/orders", "readOnly": True},
            {"name": "tls-certs", "mountPath": "/etc/tls", "readOnly": True},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "startupProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 30},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sleep", "5"]}}},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def istio_container() -> Obj:
    return {
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.22.0",
        "args": ["proxy", "sidecar"],
        "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
    }


def orders_deployment() -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "orders",
            "namespace": NS,
            "uid": DEPLOY_UID,
            "resourceVersion": "48213",
            "generation": 7,
            "creationTimestamp": "2026-01-10T09:00:00Z",
            "labels": {"app": "orders", "team": "checkout"},
            "annotations": {"deployment.kubernetes.io/revision": "7", "owner": "checkout-team"},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "orders"}},
            "strategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {"app": "orders", "version": "v1"}},
                "spec": {
                    "serviceAccountName": "orders",
                    "containers": [app_container(), istio_container()],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "orders-config"}},
                        {"name": "tls-certs", "secret": {"secretName": "orders-tls"}},
                    ],
                },
            },
        },
        "status": {"replicas": 3, "readyReplicas": 3},
    }


def orders_replicaset() -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": "orders-7d9f8c6b5",
            "namespace": NS,
            "uid": RS_UID,
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders", "uid": DEPLOY_UID, "controller": True}
            ],
        },
    }


def _sa_mount() -> Obj:
    return {
        "name": "kube-api-access-x7k2p",
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": True,
    }


def orders_pod(suffix: str = "abcde") -> Obj:
    app = app_container()
    app["volumeMounts"].append(_sa_mount())
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"orders-7d9f8c6b5-{suffix}",
            "namespace": NS,
            "uid": f"pod-{suffix}",
            "labels": {"app": "orders", "version": "v1", "pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "orders-7d9f8c6b5",
                    "uid": RS_UID,
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [app, istio_container()], "nodeName": "node-1"},
        "status": {"phase": "Running"},
    }


def orders_service() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "orders", "namespace": NS, "uid": "svc-orders"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.12.34",
            "selector": {"app": "orders"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
            ],
        },
    }


def ledger_statefulset() -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "ledger", "namespace": NS, "uid": STS_UID, "resourceVersion": "777"},
        "spec": {
            "serviceName": "ledger",
            "replicas": 2,
            "selector": {"matchLabels": {"app": "ledger"}},
            "template": {
                "metadata": {"labels": {"app": "ledger"}},
                "spec": {
                    "containers": [
                        {
                            "name": "ledger",
                            "image": "registry.example.com/shop/ledger:2.0",
                            "ports": [{"containerPort": 7000}],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        },
                        {
                            "name": "linkerd-proxy",
                            "image": "cr.l5d.io/linkerd/proxy:stable",
                            "ports": [{"name": "linkerd-proxy", "containerPort": 4143}],
                        },
                    ]
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"]}}],
        },
    }


def ledger_pod(ordinal: int = 0) -> Obj:
    sts = ledger_statefulset()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"ledger-{ordinal}",
            "namespace": NS,
            "labels": {"app": "ledger"},
            "ownerReferences": [{"kind": "StatefulSet", "name": "ledger", "uid": STS_UID, "controller": True}],
        },
        "spec": sts["spec"]["template"]["spec"],
    }


def ledger_service() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ledger", "namespace": NS},
        "spec": {"clusterIP": "None", "selector": {"app": "ledger"}, "ports": [{"port": 7000}]},
    }


def echo_pod() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "echo",
            "namespace": NS,
            "uid": "pod-echo",
            "resourceVersion": "999",
            "creationTimestamp": "2026-01-10T09:00:00Z",
            "labels": {"app": "echo"},
        },
        "spec": {
            "nodeName": "node-2",
            "containers": [
                {
                    "name": "echo",
                    "image": "registry.example.com/echo:1",
                    "command": ["/echo"],
                    "ports": [{"containerPort": 5678}],
                    "readinessProbe": {"tcpSocket": {"port": 5678}},
                    "volumeMounts": [_sa_mount()],
                }
            ],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": []}}],
            "ephemeralContainers": [{"name": "debugger", "image": "busybox"}],
        },
        "status": {"phase": "Running", "podIP": "10.244.0.12"},
    }


def echo_service() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 5678}]},
    }
