"""Certificates and kubeconfigs for the embedded cluster, made locally with openssl.

One CA signs everything: the API server's serving cert, the kubelet's serving cert, and a
client cert per component (the name and group in each are what Node and RBAC
authorisation see). Files already present are kept, so ``up`` after ``up`` is a no-op.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .layout import Layout

__all__ = ["Identity", "ensure_pki", "identities", "write_kubeconfig"]


@dataclass(frozen=True)
class Identity:
    file: str
    common_name: str
    organisation: str = ""
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    server: bool = False


def identities(layout: Layout) -> list[Identity]:
    node = layout.node_name
    return [
        Identity(
            "apiserver",
            "kube-apiserver",
            dns_names=(
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{layout.cluster_domain}",
                "localhost",
            ),
            ips=(layout.kubernetes_service_ip, layout.node_ip, "127.0.0.1"),
            server=True,
        ),
        Identity(
            "kubelet-serving",
            f"system:node:{node}",
            "system:nodes",
            (node, "localhost"),
            (layout.node_ip, "127.0.0.1"),
            server=True,
        ),
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client"),
        Identity("admin", "pytest-bridge-admin", "system:masters"),
        Identity("controller-manager", "system:kube-controller-manager"),
        Identity("scheduler", "system:kube-scheduler"),
        Identity("kubelet", f"system:node:{node}", "system:nodes"),
        Identity("proxy", "system:kube-proxy"),
    ]


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _issue(pki: Path, ident: Identity) -> None:
    key, crt = pki / f"{ident.file}.key", pki / f"{ident.file}.crt"
    _new_key(key)
    subject = f"/CN={ident.common_name}" + (f"/O={ident.organisation}" if ident.organisation else "")
    usage = "serverAuth" if ident.server else "clientAuth"
    sans = [f"DNS:{d}" for d in ident.dns_names] + [f"IP:{ip}" for ip in ident.ips]
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    with tempfile.NamedTemporaryFile("w", suffix=".ext", delete=False) as extfile:
        extfile.write("\n".join(ext) + "\n")
    try:
        csr = pki / f"{ident.file}.csr"
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-days", "825", "-sha256", "-extfile", extfile.name, "-out", str(crt),
        )  # fmt: skip
        csr.unlink()
    finally:
        Path(extfile.name).unlink()


def ensure_pki(layout: Layout) -> None:
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").exists():
        _new_key(pki / "ca.key")
        _openssl(
            "req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj", "/CN=pytest-bridge-embedded-ca",
            "-days", "3650", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", str(pki / "ca.crt"),
        )  # fmt: skip
    if not (pki / "sa.key").exists():
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
        _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    for ident in identities(layout):
        if not (pki / f"{ident.file}.crt").exists():
            _issue(pki, ident)
    for name in ("admin", "controller-manager", "scheduler", "kubelet", "proxy"):
        target = layout.admin_kubeconfig if name == "admin" else pki / f"{name}.kubeconfig"
        if not target.exists():
            write_kubeconfig(layout, target, name)


def write_kubeconfig(layout: Layout, target: Path, identity_file: str) -> None:
    pki = layout.pki
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "pytest-bridge-embedded",
                "cluster": {"server": layout.apiserver_url, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": identity_file,
                "user": {
                    "client-certificate": str(pki / f"{identity_file}.crt"),
                    "client-key": str(pki / f"{identity_file}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "pytest-bridge-embedded",
                "context": {
                    "cluster": "pytest-bridge-embedded",
                    "user": identity_file,
                    "namespace": "default",
                },
            }
        ],
        "current-context": "pytest-bridge-embedded",
    }
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)
