// daprd as the virtufin deployment runs it: dapr's own entry point
// (cmd/daprd/app), built with exactly the components the NixOS module and
// the tests render — state.redis, pubsub.redis and secretstores.local.file —
// instead of dapr's "stablecomponents" set of ~50 (cloud SDKs we never load).
//
// dapr's components package panics on purpose when built without a component
// build tag (zz_notag.go); build.sh swaps that one file for notag.go.in with
// `go build -overlay`, so nothing else from dapr is changed.
package main

import (
	pubsubredis "github.com/dapr/components-contrib/pubsub/redis"
	secretfile "github.com/dapr/components-contrib/secretstores/local/file"
	stateredis "github.com/dapr/components-contrib/state/redis"
	"github.com/dapr/dapr/cmd/daprd/app"
	pubsubloader "github.com/dapr/dapr/pkg/components/pubsub"
	secretloader "github.com/dapr/dapr/pkg/components/secretstores"
	stateloader "github.com/dapr/dapr/pkg/components/state"
)

func init() {
	// The same names dapr registers them under (component types state.redis,
	// pubsub.redis, secretstores.local.file).
	stateloader.DefaultRegistry.RegisterComponent(stateredis.NewRedisStateStore, "redis")
	pubsubloader.DefaultRegistry.RegisterComponent(pubsubredis.NewRedisStreams, "redis")
	secretloader.DefaultRegistry.RegisterComponent(secretfile.NewLocalSecretStore, "local.file")
}

func main() {
	app.Run()
}
