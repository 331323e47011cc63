"""The real-cluster harness: `python -m e2e.cluster up|down|status|kubeconfig|logs`.

Which cluster, in order: the one named by ``--kubeconfig``/``$KUBECONFIG``; kind with
``kind-config.yaml`` when kind, Docker and its node image are present; otherwise the
*embedded* cluster: a single node built here from Go modules (Kubernetes, etcd, CoreDNS,
crictl) and Debian's containerd, runc, CNI plugins and iptables.

Layers: ``layout`` (paths, addresses, ports; pure), ``prereq`` (fast, clear refusals),
``gobuild`` (cached builds), ``pki`` (certificates and kubeconfigs), ``procs`` (start/stop
of long-running processes with pidfiles and one log per component), ``hostnet``
(interfaces, sysctls, iptables: everything ``down`` must undo), ``images`` (images built
through Docker without a registry and imported into containerd), ``embedded`` and
``kind`` (the two backends), ``__main__`` (the CLI). Nothing here is imported by the plugin.
"""
