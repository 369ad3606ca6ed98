//! The node's BPF datapath: load the objects once, pin their maps under a
//! versioned path, attach the same program instances to every pod veth,
//! and write the maps. On restart the pinned maps are re-adopted and the
//! pinned TCX links are atomically switched to the new programs, so traffic
//! never stops.

mod attach;
mod error;
mod loader;
mod pinned;

pub use attach::{detach_pinned, AttachMode, Hook};
pub use loader::{Datapath, DatapathConfig, DatapathError, FlowFlusher, Flushed, LbEntries, RoutingMode};
pub use pinned::{LpmKeyed, PinnedHash, PinnedLpm};
