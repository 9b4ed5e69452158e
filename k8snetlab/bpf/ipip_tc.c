/*
 * IP-in-IP (Calico ipipMode) between nodes, done by two tc BPF programs on the
 * node's underlay interface, because this kernel has no ipip device (no tunl0).
 *
 * knl_ipip_encap  (tc egress of the node's eth0)
 *   An IPv4 packet leaving the node whose destination falls in a remote pod CIDR
 *   (longest-prefix match in the map knl_tunnels) gets a 20-byte outer IPv4
 *   header between the Ethernet header and the packet:
 *
 *       before:  | eth (14) | IP 10.244.1.2 > 10.244.2.2 | payload |
 *       after:   | eth (14) | IP node1 > node2, proto 4, DF, ttl 64 | IP 10.244.1.2 > 10.244.2.2 | payload |
 *
 *   The Ethernet header is left as the kernel built it: the node routes the
 *   remote pod CIDR host-gw style ("10.244.2.0/24 via <node2> dev eth0"), so the
 *   neighbour lookup already put node2's MAC address in it. Packets that are
 *   already IP-in-IP, not IPv4, or not to a tunnelled CIDR pass untouched.
 *
 * knl_ipip_decap  (tc ingress of the node's eth0)
 *   An IPv4 packet with protocol 4, a 20-byte header without options, not a
 *   fragment, a valid header checksum and a source that is a known peer node
 *   (hash map knl_peers) loses its outer header; the inner packet then goes
 *   through the node's normal routing to the pod's cali* veth. Anything else
 *   passes (TC_ACT_OK).
 *
 * Why tc egress and not route encap (lwt_xmit + bpf_lwt_push_encap): with the
 * pods' default TSO, large GSO packets vanished after lwt encap and TCP fell to
 * kbit/s. bpf_skb_adjust_room(..., BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) instead marks a
 * GSO packet SKB_GSO_IPXIP4 and records the inner headers, so the stack (or the
 * veth peer) segments it as a tunnel packet and fixes the outer tot_len, id and
 * checksum per segment. BPF_F_ADJ_ROOM_FIXED_GSO keeps gso_size: the pods' MTU
 * (1480) already leaves room for the outer header on a 1500-byte underlay.
 *
 * A failed adjust_room drops the packet (TC_ACT_SHOT) rather than letting it out
 * without its tunnel header, and counts it in knl_stats so that it shows.
 *
 * Maps (pinned per node by the loader, never shared between nodes or clusters):
 *   knl_tunnels  LPM trie  {u32 prefixlen (host order), be32 pod CIDR}
 *                          -> {be32 remote node IP, be32 local node IP}
 *   knl_peers    hash      be32 peer node IP -> u8 (1)
 *   knl_stats    per-CPU array of u64 counters, index enum knl_stat
 */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/*
 * BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (Linux 6.3) clears the tunnel GSO type and the
 * encapsulation mark of a decapsulated GSO packet. Debian 12's uapi headers
 * predate it, and as an enum member it cannot be tested with #ifdef, so it
 * carries our own name here.
 */
#define KNL_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

#define KNL_IP_DF      0x4000
#define KNL_IP_FRAG    0x3fff   /* MF and fragment offset */
#define KNL_OUTER_TTL  64

struct knl_tunnel_key {
	__u32 prefixlen;   /* host byte order, as the LPM trie wants it */
	__u32 addr;        /* network byte order */
};

struct knl_tunnel {
	__u32 remote;      /* network byte order: outer daddr */
	__u32 local;       /* network byte order: outer saddr */
};

enum knl_stat {
	KNL_STAT_ENCAP = 0,
	KNL_STAT_ENCAP_ERR,
	KNL_STAT_DECAP,
	KNL_STAT_DECAP_ERR,
	KNL_STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, struct knl_tunnel_key);
	__type(value, struct knl_tunnel);
} knl_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} knl_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KNL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} knl_stats SEC(".maps");

static __always_inline void knl_count(__u32 idx)
{
	__u64 *n = bpf_map_lookup_elem(&knl_stats, &idx);

	if (n)
		*n += 1;
}

/* One's-complement sum of a 20-byte header; 0 when its check field is right. */
static __always_inline __u16 knl_ip_csum(const struct iphdr *ip)
{
	const __u16 *word = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

SEC("tc")
int knl_ipip_encap(struct __sk_buff *skb)
{
	struct knl_tunnel_key key = { .prefixlen = 32 };
	struct knl_tunnel *tun;
	struct iphdr inner, outer = {};
	__u32 remote, local, len;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &inner, sizeof(inner)) < 0)
		return TC_ACT_OK;
	if (inner.version != 4 || inner.protocol == IPPROTO_IPIP)
		return TC_ACT_OK;

	key.addr = inner.daddr;
	tun = bpf_map_lookup_elem(&knl_tunnels, &key);
	if (!tun)
		return TC_ACT_OK;
	remote = tun->remote;
	local = tun->local;

	if (bpf_skb_adjust_room(skb, sizeof(outer), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_FIXED_GSO) < 0) {
		knl_count(KNL_STAT_ENCAP_ERR);
		return TC_ACT_SHOT;
	}

	/* A GSO packet is longer than 64 KiB only with BIG TCP; segmentation
	 * rewrites tot_len per segment anyway. */
	len = skb->len - ETH_HLEN;
	if (len > 0xffff)
		len = 0xffff;

	outer.version = 4;
	outer.ihl = sizeof(outer) / 4;
	outer.tot_len = bpf_htons((__u16)len);
	outer.frag_off = bpf_htons(KNL_IP_DF);
	outer.ttl = KNL_OUTER_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = local;
	outer.daddr = remote;
	outer.check = knl_ip_csum(&outer);

	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0) < 0) {
		knl_count(KNL_STAT_ENCAP_ERR);
		return TC_ACT_SHOT;
	}
	knl_count(KNL_STAT_ENCAP);
	return TC_ACT_OK;
}

SEC("tc")
int knl_ipip_decap(struct __sk_buff *skb)
{
	struct iphdr outer;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) < 0)
		return TC_ACT_OK;
	if (outer.version != 4 || outer.ihl != 5 || outer.protocol != IPPROTO_IPIP)
		return TC_ACT_OK;
	/* Fragments and corrupt headers are left to the IP layer (which drops them). */
	if (outer.frag_off & bpf_htons(KNL_IP_FRAG))
		return TC_ACT_OK;
	if (knl_ip_csum(&outer) != 0)
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&knl_peers, &outer.saddr))
		return TC_ACT_OK;

	if (bpf_skb_adjust_room(skb, -(__s32)sizeof(outer), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO |
				KNL_F_ADJ_ROOM_DECAP_L3_IPV4) < 0) {
		knl_count(KNL_STAT_DECAP_ERR);
		return TC_ACT_SHOT;
	}
	knl_count(KNL_STAT_DECAP);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
