// Kernel drop reasons per network namespace (k8snetlab/drops.py): a raw tracepoint on
// skb:kfree_skb (fired for every skb freed as a drop, with its enum skb_drop_reason; freed
// as consumed it goes to skb:consume_skb instead) counts drops by (netns inode, reason).
// The namespace is the one of skb->dev, else of the skb's socket, else 0 (unknown); only
// the namespaces user space put in knl_watch are counted (the machine's others are not).
// CO-RE: the few kernel structs are declared here with the fields read and relocated
// against the running kernel's BTF at load time, so no vmlinux.h is needed.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

struct ns_common { unsigned int inum; } __attribute__((preserve_access_index));
struct net { struct ns_common ns; } __attribute__((preserve_access_index));
typedef struct { struct net *net; } possible_net_t;
struct net_device { possible_net_t nd_net; } __attribute__((preserve_access_index));
struct sock_common { possible_net_t skc_net; } __attribute__((preserve_access_index));
struct sock { struct sock_common __sk_common; } __attribute__((preserve_access_index));
struct sk_buff { struct net_device *dev; struct sock *sk; } __attribute__((preserve_access_index));

struct drop_key {
    __u32 netns;     // inode of the network namespace, 0 if neither device nor socket says
    __u32 reason;    // enum skb_drop_reason
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8192);
    __type(key, struct drop_key);
    __type(value, __u64);
} knl_drops SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u32);       // netns inode
    __type(value, __u8);
} knl_watch SEC(".maps");

SEC("raw_tracepoint/kfree_skb")
int knl_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
    // TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
    struct sk_buff *skb = (struct sk_buff *)ctx->args[0];
    struct drop_key key = { .netns = 0, .reason = (__u32)ctx->args[2] };
    struct net_device *dev = BPF_CORE_READ(skb, dev);
    if (dev) {
        key.netns = BPF_CORE_READ(dev, nd_net.net, ns.inum);
    } else {
        struct sock *sk = BPF_CORE_READ(skb, sk);
        if (sk)
            key.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
    }
    if (!bpf_map_lookup_elem(&knl_watch, &key.netns))
        return 0;
    __u64 one = 1, *count = bpf_map_lookup_elem(&knl_drops, &key);
    if (count) {
        __sync_fetch_and_add(count, 1);
    } else if (bpf_map_update_elem(&knl_drops, &key, &one, BPF_NOEXIST) != 0) {
        count = bpf_map_lookup_elem(&knl_drops, &key);   // another CPU inserted it first
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    return 0;
}

char _license[] SEC("license") = "GPL";
