//! BPF_PROG_TEST_RUN for TC programs: the kernel builds an skb from our bytes
//! on the device named by `__sk_buff.ifindex` (looked up in the calling
//! thread's network namespace), runs the program once and copies the
//! possibly rewritten frame back. Redirects are recorded, not performed.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

const _: () = assert!(size_of::<TestRunAttr>() == 80);
const _: () = assert!(offset_of!(TestRunAttr, ctx_in) == 48);
const _: () = assert!(offset_of!(TestRunAttr, batch_size) == 72);

/// `struct __sk_buff` from linux/bpf.h. The kernel accepts only a few fields
/// as input (mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len,
/// gso_*, hwtstamp) and rejects a context with anything else set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkBuff {
    pub len: u32,
    pub pkt_type: u32,
    pub mark: u32,
    pub queue_mapping: u32,
    pub protocol: u32,
    pub vlan_present: u32,
    pub vlan_tci: u32,
    pub vlan_proto: u32,
    pub priority: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub tc_index: u32,
    pub cb: [u32; 5],
    pub hash: u32,
    pub tc_classid: u32,
    pub data: u32,
    pub data_end: u32,
    pub napi_id: u32,
    pub family: u32,
    pub remote_ip4: u32,
    pub local_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub local_ip6: [u32; 4],
    pub remote_port: u32,
    pub local_port: u32,
    pub data_meta: u32,
    pub flow_keys: u64,
    pub tstamp: u64,
    pub wire_len: u32,
    pub gso_segs: u32,
    pub sk: u64,
    pub gso_size: u32,
    pub tstamp_type: u8,
    pub pad: [u8; 3],
    pub hwtstamp: u64,
}

// Offsets as printed by a C program compiled against linux/bpf.h.
const _: () = assert!(size_of::<SkBuff>() == 192);
const _: () = assert!(offset_of!(SkBuff, ifindex) == 40);
const _: () = assert!(offset_of!(SkBuff, flow_keys) == 144);
const _: () = assert!(offset_of!(SkBuff, hwtstamp) == 184);

/// What the program did with one frame.
#[derive(Debug)]
pub struct Outcome {
    /// The program's return value: a TC verdict.
    pub verdict: u32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
    /// The context after the run (the kernel fills ifindex, mark, cb...).
    pub ctx: SkBuff,
}

/// Runs a TC program `repeat` times on the same skb made from `frame` and
/// the context fields the kernel accepts (`ctx_in`); also returns the
/// kernel's mean run time in ns.
pub fn run_tc_ctx(prog: BorrowedFd<'_>, frame: &[u8], ctx_in: SkBuff, repeat: u32) -> io::Result<(Outcome, u32)> {
    let mut ctx_out = SkBuff::default();
    // Programs here never grow a frame by more than a tunnel header; a
    // page is the kernel's own limit for test-run skbs.
    let mut data_out = vec![0u8; 4096];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: u32::try_from(frame.len()).expect("test frames are small"),
        data_size_out: data_out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<SkBuff>() as u32,
        ctx_size_out: size_of::<SkBuff>() as u32,
        ctx_in: &ctx_in as *const SkBuff as u64,
        ctx_out: &mut ctx_out as *mut SkBuff as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: attr is a fully initialised `test` member of bpf_attr and the
    // size passed is its size. The kernel reads data_in/ctx_in for the given
    // sizes (both live borrows for the whole call) and writes at most
    // data_size_out/ctx_size_out bytes into data_out/ctx_out, which we own
    // mutably and which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    data_out.truncate(attr.data_size_out as usize);
    Ok((
        Outcome {
            verdict: attr.retval,
            frame: data_out,
            ctx: ctx_out,
        },
        attr.duration,
    ))
}

/// A readable name for a verdict in assertion messages.
pub fn verdict_name(v: u32) -> String {
    match v {
        TC_ACT_OK => "TC_ACT_OK".into(),
        TC_ACT_SHOT => "TC_ACT_SHOT".into(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
        other => format!("verdict {other}"),
    }
}
