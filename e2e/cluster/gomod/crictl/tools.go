//go:build tools

// Package tools pins crictl, which the harness uses to stop every pod sandbox (so CNI
// cleans up after itself) before it stops containerd.
package tools

import _ "sigs.k8s.io/cri-tools/cmd/crictl"
