//! Attaching programs to interfaces: TCX links (pinned, so they outlive the
//! agent) on kernels that have TCX, clsact filters with a fixed priority and
//! handle otherwise (they belong to the qdisc and outlive the agent anyway).

use std::io;
use std::path::Path;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;

use super::DatapathError;

/// How programs are attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Linux 6.6+: bpf_mprog links, pinned under the links directory.
    Tcx,
    /// Older kernels: cls_bpf filters on a clsact qdisc.
    Clsact,
}

impl AttachMode {
    pub fn detect() -> Self {
        if aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// Which side of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

// Our clsact filter lives at a fixed place so that a restart replaces it
// instead of stacking a second copy.
const CLSACT_PRIORITY: u16 = 1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Attaches `prog` to `ifname` at `hook`, replacing what an earlier agent
/// attached there (atomically with TCX).
pub fn attach(
    prog: &mut SchedClassifier,
    mode: AttachMode,
    ifname: &str,
    hook: Hook,
    link_pin: &Path,
) -> Result<(), DatapathError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
        ifname: ifname.to_string(),
        hook: hook.name(),
        source,
    };
    match mode {
        AttachMode::Tcx => {
            let id = match PinnedLink::from_pin(link_pin) {
                Ok(old) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| err(e.into()))?;
                    prog.attach_to_link(link).map_err(|e| err(e.into()))?
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    prog.attach_with_options(ifname, hook.tc(), TcAttachOptions::TcxOrder(LinkOrder::default()))
                        .map_err(|e| err(e.into()))?
                }
                Err(e) => return Err(err(e.into())),
            };
            let link = prog.take_link(id).map_err(|e| err(e.into()))?;
            let fd: FdLink = link.try_into().map_err(|e: LinkError| err(e.into()))?;
            if !link_pin.exists() {
                fd.pin(link_pin).map_err(|source| DatapathError::Pin {
                    path: link_pin.to_path_buf(),
                    source: Box::new(source),
                })?;
            }
            Ok(())
        }
        AttachMode::Clsact => {
            if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
                // EEXIST: the qdisc is there from an earlier attach.
                if !matches!(e, TcError::AlreadyAttached) && tc_errno(&e) != Some(libc::EEXIST) {
                    return Err(err(e.into()));
                }
            }
            let opts = || {
                TcAttachOptions::Netlink(NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle: CLSACT_HANDLE,
                    classid: None,
                })
            };
            let id = match prog.attach_with_options(ifname, hook.tc(), opts()) {
                Ok(id) => id,
                // An earlier agent's filter holds our priority and handle:
                // change it in place (cls_bpf swaps the program atomically,
                // and no second filter is created). Any other failure is
                // reported as it is, not masked by a replace that would then
                // fail for a different reason.
                Err(e) if program_errno(&e) == Some(libc::EEXIST) => {
                    let link = SchedClassifierLink::attached(ifname, hook.tc(), CLSACT_PRIORITY, CLSACT_HANDLE, None)
                        .map_err(|e| err(e.into()))?;
                    prog.attach_to_link(link).map_err(|e| err(e.into()))?
                }
                Err(e) => return Err(err(e.into())),
            };
            // Forget the link: dropping it must not remove the filter.
            let link = prog.take_link(id).map_err(|e| err(e.into()))?;
            std::mem::forget(link);
            Ok(())
        }
    }
}

/// The errno of a failed tc netlink request, if the kernel sent one.
fn tc_errno(e: &TcError) -> Option<i32> {
    match e {
        TcError::NetlinkError(n) => n.raw_os_error(),
        TcError::IoError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// [`tc_errno`] for an error from attaching a program.
fn program_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(t) => tc_errno(t),
        ProgramError::NetlinkError(n) => n.raw_os_error(),
        _ => None,
    }
}

/// Removes what [`attach`] left: the pinned TCX link. clsact filters go with
/// the interface.
pub fn detach_pinned(link_pin: &Path) {
    if let Ok(link) = PinnedLink::from_pin(link_pin) {
        // Closing the last reference detaches the TCX link.
        drop(link.unpin());
    }
    let _ = std::fs::remove_file(link_pin);
}
