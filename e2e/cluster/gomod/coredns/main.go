// Command coredns is CoreDNS with only the plugins the embedded cluster's DNS needs,
// built from the published Go module (the full build pulls in every cloud SDK).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// Order matters: it is the order plugins see a query in.
var directives = []string{
	"reload", "health", "ready", "log", "errors", "cache", "loadbalance", "hosts", "kubernetes",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
