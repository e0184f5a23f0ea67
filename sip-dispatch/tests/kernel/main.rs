//! Kernel tests: the compiled XDP program, run by the kernel through BPF_PROG_TEST_RUN.
//! Each test runs in a private network namespace (its thread unshares one) with a veth,
//! permanent neighbour entries for the backends and forwarding on, so that
//! `bpf_fib_lookup` answers as it would on a dispatcher (`harness.rs`).
//!
//! - `fixtures`: the table of one-frame cases (frame in, verdict, counters and output out);
//! - `agreement`: the kernel against userspace (table, slow path, torture and golden corpora);
//! - `affinity`, `forwarding`, `next_hop`: call affinity, the forwarding modes and the
//!   next-hop cache, cases that need state or a sequence of frames;
//! - `decap`: the backend's `ipip_decap` program.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN); fails loudly without it.
mod affinity;
mod agreement;
mod decap;
mod fixtures;
mod forwarding;
mod harness;
mod next_hop;
