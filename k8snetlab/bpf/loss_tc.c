// Random packet loss on a shaped link's egress (k8snetlab/shaping.py): each packet is dropped
// when the kernel's per-packet random number is below LOSS_THRESHOLD (loss * 2^32), given at
// compile time. No netem needed; this kernel has neither netem nor the gact/police actions.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#ifndef LOSS_THRESHOLD
#define LOSS_THRESHOLD 0
#endif

SEC("tc")
int knl_loss(struct __sk_buff *skb)
{
    return bpf_get_prandom_u32() < (__u32)LOSS_THRESHOLD ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "GPL";
