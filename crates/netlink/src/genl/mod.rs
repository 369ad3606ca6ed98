//! Generic netlink (NETLINK_GENERIC): families are registered by name and
//! get a message type (their id) at runtime, which `nlctrl` (the control
//! family, id 0x10) tells on request (CTRL_CMD_GETFAMILY). Every generic
//! message carries a 4-byte `genlmsghdr` (command, version) before its
//! attributes. [`wireguard`] is the one family Sinew speaks.

pub mod wireguard;

use std::fs::File;

use nix::errno::Errno;

use crate::message::{attrs, read_cstr, read_u16, read_u32, MsgBuilder, NLM_F_REQUEST};
use crate::socket::{NetlinkError, Protocol, Socket};

// linux/genetlink.h. ABI.
pub const GENL_HDRLEN: usize = 4;
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_NEWFAMILY: u8 = 1;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_VERSION: u16 = 3;
pub const CTRL_ATTR_MAXATTR: u16 = 5;
/// nlctrl's own version.
const CTRL_VERSION: u8 = 2;

/// A generic netlink message: family `family` (its id), command `cmd`,
/// family version `version`, then the caller's attributes.
pub fn genl_msg(family: u16, flags: u16, cmd: u8, version: u8) -> MsgBuilder {
    let mut m = MsgBuilder::new(family, NLM_F_REQUEST | flags);
    m.bytes(&[cmd, version, 0, 0]);
    m
}

/// A family as nlctrl reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    pub name: String,
    pub version: u32,
    pub max_attr: u32,
}

/// The CTRL_CMD_GETFAMILY request for `name`.
pub fn get_family_msg(name: &str) -> MsgBuilder {
    let mut m = genl_msg(GENL_ID_CTRL, 0, CTRL_CMD_GETFAMILY, CTRL_VERSION);
    m.attr_str(CTRL_ATTR_FAMILY_NAME, name);
    m
}

/// A family from nlctrl's CTRL_CMD_NEWFAMILY reply payload.
pub fn parse_family(payload: &[u8]) -> Option<Family> {
    if *payload.first()? != CTRL_CMD_NEWFAMILY {
        return None;
    }
    let mut f = Family {
        id: 0,
        name: String::new(),
        version: 0,
        max_attr: 0,
    };
    for (ty, data) in attrs(payload.get(GENL_HDRLEN..)?) {
        match ty {
            CTRL_ATTR_FAMILY_ID => f.id = read_u16(data, 0)?,
            CTRL_ATTR_FAMILY_NAME => f.name = read_cstr(data),
            CTRL_ATTR_VERSION => f.version = read_u32(data, 0)?,
            CTRL_ATTR_MAXATTR => f.max_attr = read_u32(data, 0)?,
            _ => {}
        }
    }
    (f.id != 0).then_some(f)
}

/// A blocking generic netlink socket in one network namespace.
pub struct Genl {
    pub(crate) sock: Socket,
}

impl Genl {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open(Protocol::Generic)?,
        })
    }

    /// A socket in the network namespace `netns` (`path` names it in errors).
    pub fn open_in(netns: &File, path: &str) -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: Socket::open_in(Protocol::Generic, netns, path)?,
        })
    }

    /// The family called `name`; None when the kernel has no such family
    /// (its module is not loaded, or not built).
    pub fn family(&mut self, name: &str) -> Result<Option<Family>, NetlinkError> {
        match self.sock.request_one(
            get_family_msg(name),
            GENL_ID_CTRL,
            &format!("resolve the generic netlink family {name:?}"),
            parse_family,
        ) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{NLMSG_HDRLEN, NLM_F_DUMP};

    #[test]
    fn getfamily_request_layout() {
        // nlmsghdr (type GENL_ID_CTRL), genlmsghdr {cmd 3, version, 0},
        // CTRL_ATTR_FAMILY_NAME "wireguard\0" (4 + 10, padded to 16).
        let b = get_family_msg("wireguard").finish(9);
        assert_eq!(b.len(), NLMSG_HDRLEN + GENL_HDRLEN + 16);
        assert_eq!(read_u32(&b, 0), Some(b.len() as u32));
        assert_eq!(read_u16(&b, 4), Some(GENL_ID_CTRL));
        assert_eq!(read_u16(&b, 6), Some(NLM_F_REQUEST));
        assert_eq!(&b[16..20], &[CTRL_CMD_GETFAMILY, CTRL_VERSION, 0, 0]);
        assert_eq!(read_u16(&b, 20), Some(14));
        assert_eq!(read_u16(&b, 22), Some(CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&b[24..34], b"wireguard\0");
        assert_eq!(&b[34..36], &[0, 0]);
        let d = genl_msg(0x1c, NLM_F_DUMP, 0, 1).finish(1);
        assert_eq!(read_u16(&d, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
    }

    #[test]
    fn parse_family_reads_id_name_version() {
        let mut m = MsgBuilder::new(GENL_ID_CTRL, 0);
        m.bytes(&[CTRL_CMD_NEWFAMILY, 2, 0, 0]);
        m.attr_str(CTRL_ATTR_FAMILY_NAME, "wireguard");
        m.attr_u16(CTRL_ATTR_FAMILY_ID, 0x22);
        m.attr_u32(CTRL_ATTR_VERSION, 1);
        m.attr_u32(CTRL_ATTR_MAXATTR, 8);
        let b = m.finish(1);
        assert_eq!(
            parse_family(&b[NLMSG_HDRLEN..]),
            Some(Family {
                id: 0x22,
                name: "wireguard".into(),
                version: 1,
                max_attr: 8
            })
        );
        // Another command, or no id: not a family.
        let mut m = MsgBuilder::new(GENL_ID_CTRL, 0);
        m.bytes(&[CTRL_CMD_GETFAMILY, 2, 0, 0]);
        m.attr_u16(CTRL_ATTR_FAMILY_ID, 0x22);
        assert_eq!(parse_family(&m.finish(1)[NLMSG_HDRLEN..]), None);
        assert_eq!(parse_family(&[CTRL_CMD_NEWFAMILY, 2, 0, 0]), None);
    }

    /// nlctrl resolves itself on any kernel, and a family nobody
    /// registered is None, not an error (needs no privilege). Names are
    /// at most 15 bytes (GENL_NAMSIZ); a longer one is EINVAL.
    #[test]
    fn nlctrl_resolves_itself_and_a_missing_family_is_none() {
        let mut g = Genl::open().unwrap();
        let ctrl = g.family("nlctrl").unwrap().expect("nlctrl");
        assert_eq!(ctrl.id, GENL_ID_CTRL);
        assert_eq!(ctrl.name, "nlctrl");
        assert_eq!(g.family("sinew-nofam").unwrap(), None);
    }
}
