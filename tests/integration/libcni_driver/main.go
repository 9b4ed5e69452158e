// A small container runtime on libcni (the library containerd and CRI-O use): runs ADD, CHECK,
// DEL and DEL again of one network config list for one container, executing the plugins as
// libcni does. Prints one line per step: "ADD <result JSON>", "CHECK ok", "DEL ok", "DEL2 ok";
// a failed step prints "<STEP> error: ..." and exits 1.
//
//	driver <conflist file> <netns path> <container id> <ifname> <plugin dir> <cache dir> [<capability args JSON>]
//
// The capability arguments (portMappings, bandwidth...) are what libcni copies into the
// runtimeConfig of the plugins whose config declares them in "capabilities".
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if len(os.Args) != 7 && len(os.Args) != 8 {
		fmt.Fprintln(os.Stderr, "usage: driver CONFLIST NETNS CONTAINERID IFNAME PLUGINDIR CACHEDIR [CAPABILITYARGS]")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[1])
	if err != nil {
		fmt.Println("LOAD error:", err)
		os.Exit(1)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{os.Args[5]}, os.Args[6], nil)
	rt := &libcni.RuntimeConf{ContainerID: os.Args[3], NetNS: os.Args[2], IfName: os.Args[4],
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "libcni-pod"}}}
	if len(os.Args) == 8 {
		if err := json.Unmarshal([]byte(os.Args[7]), &rt.CapabilityArgs); err != nil {
			fmt.Println("LOAD error:", err)
			os.Exit(1)
		}
	}
	ctx := context.Background()
	res, err := cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		fmt.Println("ADD error:", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(res)
	fmt.Println("ADD", string(out))
	if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
		fmt.Println("CHECK error:", err)
		os.Exit(1)
	}
	fmt.Println("CHECK ok")
	for _, step := range []string{"DEL", "DEL2"} {
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fmt.Println(step, "error:", err)
			os.Exit(1)
		}
		fmt.Println(step, "ok")
	}
}
