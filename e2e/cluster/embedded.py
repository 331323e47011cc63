"""The embedded single-node cluster: configure, start in order, wait for health, tear down.

``up`` is idempotent: every step checks before it acts, so a second ``up`` only verifies; a
component whose command line or configuration changed since it started is restarted.
``down`` stops every process it started (pods first, so CNI and kube-proxy clean up after
themselves), then sweeps what is left: iptables chains, interfaces, mounts, cgroups, state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from . import gobuild, hostnet, images, pki, procs
from .layout import Layout

__all__ = ["COMPONENTS", "down", "status", "up"]

# Start order; `down` goes in reverse.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
)
Report = Callable[[str], None]


def _write_config(path: Path, text: str) -> Path:
    # Only when it changed: kube-proxy watches its file and exits on any write, even of the same text.
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def _write_yaml(path: Path, data: object) -> Path:
    return _write_config(path, yaml.safe_dump(data, sort_keys=False))


def _containerd_config(layout: Layout) -> Path:
    # Version 2 config for containerd 1.6. restrict_oom_score_adj: the sandbox asks for a
    # negative oom_score_adj, which this VM forbids.
    text = f"""version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
[grpc]
  address = "{layout.containerd_socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{layout.state / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{layout.cni_conf_dir}"
"""
    return _write_config(layout.state / "config" / "containerd.toml", text)


def _kubelet_config(layout: Layout) -> Path:
    p = layout.pki
    return _write_yaml(
        layout.state / "config" / "kubelet.yaml",
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": layout.node_ip,
            "port": layout.ports.kubelet,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": layout.ports.kubelet_healthz,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(p / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(p / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(p / "kubelet-serving.key"),
            # containerd 1.6 lacks the RuntimeConfig call, so the driver must be explicit;
            # PID 1 is not systemd.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
            "clusterDNS": [layout.dns_service_ip],
            "clusterDomain": layout.cluster_domain,
            "podLogsDir": str(layout.state / "pod-logs"),
            "volumePluginDir": str(layout.kubelet_root / "volume-plugins"),
            # Local images can't be pulled again: never garbage-collect them mid-run.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
            "shutdownGracePeriod": "0s",
        },
    )


def _proxy_config(layout: Layout) -> Path:
    return _write_yaml(
        layout.state / "config" / "kube-proxy.yaml",
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clusterCIDR": layout.pod_cidr,
            "hostnameOverride": layout.node_name,
            "bindAddress": "0.0.0.0",
            "healthzBindAddress": f"127.0.0.1:{layout.ports.proxy_healthz}",
            "metricsBindAddress": f"127.0.0.1:{layout.ports.proxy_metrics}",
            "clientConnection": {"kubeconfig": str(layout.pki / "proxy.kubeconfig")},
            # Leave the host's conntrack sysctls alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
        },
    )


def _component(layout: Layout, name: str) -> procs.Component:
    b, p, ports = layout.bin, layout.pki, layout.ports
    if name == "etcd":
        return procs.Component(name, (
            str(b / "etcd"), "--name=pytest-bridge", f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls=http://127.0.0.1:{ports.etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{ports.etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-cluster=pytest-bridge=http://127.0.0.1:{ports.etcd_peer}",
            "--listen-metrics-urls=", "--quota-backend-bytes=2147483648", "--log-level=warn",
        ))  # fmt: skip
    if name == "kube-apiserver":
        return procs.Component(name, (
            str(b / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
            f"--bind-address={layout.node_ip}", f"--advertise-address={layout.node_ip}",
            f"--secure-port={ports.apiserver}", f"--service-cluster-ip-range={layout.service_cidr}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-account-issuer=https://kubernetes.default.svc.{layout.cluster_domain}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--profiling=false", "--endpoint-reconciler-type=lease",
        ))  # fmt: skip
    if name == "kube-controller-manager":
        return procs.Component(name, (
            str(b / "kube-controller-manager"), f"--kubeconfig={p / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={p / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={p / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports.controller_manager}",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
            "--use-service-account-credentials=true", "--leader-elect=false", "--profiling=false",
            f"--service-cluster-ip-range={layout.service_cidr}",
        ))  # fmt: skip
    if name == "kube-scheduler":
        return procs.Component(name, (
            str(b / "kube-scheduler"), f"--kubeconfig={p / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={p / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={p / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports.scheduler}", "--leader-elect=false",
            "--profiling=false",
        ))  # fmt: skip
    if name == "containerd":
        config = _containerd_config(layout)
        return procs.Component(name, ("/usr/bin/containerd", "--config", str(config)), config=config.read_text())
    if name == "kubelet":
        config = _kubelet_config(layout)
        return procs.Component(name, (
            str(b / "kubelet"), f"--config={config}",
            f"--kubeconfig={p / 'kubelet.kubeconfig'}", f"--root-dir={layout.kubelet_root}",
            f"--cert-dir={layout.kubelet_root / 'pki'}", f"--hostname-override={layout.node_name}",
            f"--node-ip={layout.node_ip}", "--v=1",
        ), config=config.read_text())  # fmt: skip
    if name == "kube-proxy":
        config = _proxy_config(layout)
        return procs.Component(name, (str(b / "kube-proxy"), f"--config={config}"), config=config.read_text())
    raise ValueError(name)


def _ssl_context(layout: Layout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return ctx


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    if ctx is None and url.startswith("https"):
        ctx = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _healthy(layout: Layout, name: str) -> bool:
    ports = layout.ports
    checks: dict[str, Callable[[], bool]] = {
        "etcd": lambda: _http_ok(f"http://127.0.0.1:{ports.etcd_client}/health"),
        "kube-apiserver": lambda: _http_ok(f"{layout.apiserver_url}/readyz", _ssl_context(layout)),
        "kube-controller-manager": lambda: _http_ok(f"https://127.0.0.1:{ports.controller_manager}/healthz"),
        "kube-scheduler": lambda: _http_ok(f"https://127.0.0.1:{ports.scheduler}/healthz"),
        "containerd": lambda: (
            subprocess.run(
                ["ctr", "--address", str(layout.containerd_socket), "version"],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        ),
        "kubelet": lambda: _http_ok(f"http://127.0.0.1:{ports.kubelet_healthz}/healthz"),
        "kube-proxy": lambda: _http_ok(f"http://127.0.0.1:{ports.proxy_healthz}/healthz"),
    }
    return checks[name]()


def _wait(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    attempts = 0
    # At least a few attempts: a suspended VM can make the deadline pass between two checks.
    while time.monotonic() < deadline or attempts < 5:
        attempts += 1
        if check():
            return
        if alive is not None and not alive():
            break
        time.sleep(0.25)
    tail = ""
    if log is not None and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; log {log}:\n{tail}")


def kubectl(layout: Layout, *args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(layout.bin / "kubectl"), f"--kubeconfig={layout.admin_kubeconfig}", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _start_and_wait(layout: Layout, name: str, timeout: float, report: Report) -> None:
    component = _component(layout, name)
    if procs.is_running(layout, name):
        if not procs.started_as(layout, component):
            report(f"{name}: command line or configuration changed since it started: restarting it")
            procs.stop(layout, name)
        elif _healthy(layout, name):
            return
    started = time.monotonic()
    procs.start(layout, component)
    _wait(
        name,
        lambda: _healthy(layout, name),
        timeout,
        layout.logs / f"{name}.log",
        lambda: procs.is_running(layout, name),
    )
    report(f"{name} ready in {time.monotonic() - started:.1f}s")


def _node_ready(layout: Layout) -> bool:
    out = kubectl(layout, "get", "node", layout.node_name, "-o", "json", check=False)
    if not out:
        return False
    conditions = json.loads(out).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def up(layout: Layout, go: str, report: Report = print, sample_app: bool = True) -> None:
    started = time.monotonic()
    layout.logs.mkdir(parents=True, exist_ok=True)
    gobuild.build_all(layout, go, layout.logs / "build.log", report)
    hostnet.prepare(layout)
    hostnet.write_cni_config(layout)
    pki.ensure_pki(layout)
    for name in COMPONENTS[:5]:
        _start_and_wait(layout, name, 90, report)
    images.ensure_images(layout, report)
    for name in COMPONENTS[5:]:
        _start_and_wait(layout, name, 90, report)
    _wait("node Ready", lambda: _node_ready(layout), 120, layout.logs / "kubelet.log")
    addons = layout.repo / "e2e" / "cluster" / "addons"
    kubectl(layout, "apply", "--server-side", "--force-conflicts", "-f", str(addons))
    kubectl(layout, "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=120s", timeout=130)
    if sample_app:
        deploy_sample_app(layout)
    report(f"cluster up in {time.monotonic() - started:.1f}s; export KUBECONFIG={layout.admin_kubeconfig}")


def deploy_sample_app(layout: Layout) -> None:
    manifests = layout.repo / "fixtures" / "manifests"
    kubectl(layout, "apply", "--server-side", "--force-conflicts", "-k", str(manifests))
    kubectl(
        layout,
        "-n",
        "bridge-demo",
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "--timeout=180s",
        timeout=190,
    )


def status(layout: Layout) -> dict[str, str]:
    result = {}
    for name in COMPONENTS:
        pid = procs.pid_of(layout, name)
        if pid is None:
            result[name] = "stopped"
        else:
            result[name] = f"running (pid {pid}, {'healthy' if _healthy(layout, name) else 'unhealthy'})"
    return result


def _extra_mount_roots(layout: Layout) -> list[Path]:
    return [layout.containerd_socket.parent, layout.containerd_state]


def _kill_leftover_shims(layout: Layout) -> None:
    marker = str(layout.containerd_socket)
    for proc in Path("/proc").iterdir():
        command = procs.cmdline(int(proc.name)) if proc.name.isdigit() else ""
        if "containerd-shim" in command and marker in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _remove_cgroups() -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        root = hierarchy / "kubepods"
        if not root.is_dir():
            continue
        for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            path.rmdir()
        root.rmdir()


def down(layout: Layout, report: Report = print) -> None:
    for name in ("kube-proxy", "kubelet"):
        procs.stop(layout, name)
    if procs.is_running(layout, "containerd"):
        # Stop and remove every pod sandbox while containerd still runs, so the CNI
        # plugins release IPs and remove their veths and iptables rules themselves.
        subprocess.run(
            [str(layout.bin / "crictl"), f"--runtime-endpoint=unix://{layout.containerd_socket}", "rmp", "-fa"],
            capture_output=True, check=False, timeout=120,
        )  # fmt: skip
    for name in (
        "containerd",
        "kube-scheduler",
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
        "dockerd",
    ):
        procs.stop(layout, name)
    _kill_leftover_shims(layout)
    if (layout.bin / "kube-proxy").exists():
        subprocess.run([str(layout.bin / "kube-proxy"), "--cleanup"], capture_output=True, check=False, timeout=60)
    hostnet.sweep(layout, _extra_mount_roots(layout))
    _remove_cgroups()
    shutil.rmtree(layout.state, ignore_errors=True)
    run_dir = layout.containerd_socket.parent
    for leftover in (layout.containerd_socket, run_dir / "containerd.sock.ttrpc"):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "s", ignore_errors=True)  # the shims' sockets
    with contextlib.suppress(OSError):
        run_dir.rmdir()
    report("cluster down")
