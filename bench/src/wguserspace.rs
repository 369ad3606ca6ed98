//! `sinew-bench wireguard-userspace`: Sinew's userspace WireGuard device
//! (`sinew-wireguard`, the one the agent runs where the kernel has no
//! WireGuard) against the two userspace implementations people run
//! instead, boringtun-cli and wireguard-go, and against the bare veth they
//! all ride on. Two network namespaces joined by one veth; in each, one
//! device of every implementation (own port, own tunnel subnet, MTU 1420);
//! iperf3 through each tunnel in turn, the arms alternating every
//! repetition; client and server pinned like every other benchmark, the
//! tunnel threads left to the scheduler on every arm alike.
//!
//! Needs root, iperf3, wireguard-tools (`wg`, which also configures the
//! other two through their UAPI sockets), wireguard-go (Debian) and
//! boringtun-cli (`cargo install boringtun-cli`).

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sinew_testvms::netns::{command_in, sh, NetNs};
use sinew_wireguard::userspace::{Config, Userspace};
use sinew_wireguard::{PeerConfig, PrivateKey};

use crate::idle;
use crate::iperf::{run_client, IperfServer};
use crate::report::{Better, Report, Row};
use crate::stats::Samples;

/// The tunnel MTU on every arm (wg-quick's default over IPv4).
const MTU: u32 = 1420;
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Veth,
    Sinew,
    Boringtun,
    WireguardGo,
}

impl Arm {
    const ALL: [Arm; 4] = [Arm::Veth, Arm::Sinew, Arm::Boringtun, Arm::WireguardGo];

    fn name(self) -> &'static str {
        match self {
            Arm::Veth => "veth (no tunnel)",
            Arm::Sinew => "sinew-wireguard",
            Arm::Boringtun => "boringtun-cli",
            Arm::WireguardGo => "wireguard-go",
        }
    }

    /// Third octet of the tunnel subnet and the UDP port's last digit.
    fn index(self) -> u8 {
        match self {
            Arm::Veth => 0,
            Arm::Sinew => 1,
            Arm::Boringtun => 2,
            Arm::WireguardGo => 3,
        }
    }

    fn port(self) -> u16 {
        51870 + u16::from(self.index())
    }

    /// The server's address on this arm: the veth's, or the tunnel's.
    fn server_addr(self) -> Ipv4Addr {
        match self {
            Arm::Veth => UNDERLAY_B,
            _ => Ipv4Addr::new(10, 100, self.index(), 2),
        }
    }

    /// Device names are global for the UAPI sockets
    /// (/var/run/wireguard/NAME.sock), so each side gets its own.
    fn ifname(self, side: char) -> String {
        let short = match self {
            Arm::Veth => "veth",
            Arm::Sinew => "swg",
            Arm::Boringtun => "bwg",
            Arm::WireguardGo => "gwg",
        };
        format!("{short}{}{side}", std::process::id() % 100_000)
    }
}

/// A key pair made by `wg genkey` / `wg pubkey`, written where `wg set`
/// reads it.
struct Keys {
    private_file: PathBuf,
    private: String,
    public: String,
}

fn keys(dir: &Path, name: &str) -> anyhow::Result<Keys> {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .context("cannot run `wg genkey`: install wireguard-tools (scripts/install-deps.sh)")?;
    let private = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), private.as_bytes())?;
    drop(child.stdin.take());
    let public = String::from_utf8(child.wait_with_output()?.stdout)?.trim().to_owned();
    let private_file = dir.join(format!("{name}.key"));
    std::fs::write(&private_file, format!("{private}\n"))?;
    Ok(Keys {
        private_file,
        private,
        public,
    })
}

/// Everything one run set up; dropping it stops the processes and removes
/// the namespaces (the devices go with them).
struct Setup {
    a: NetNs,
    b: NetNs,
    procs: Vec<Child>,
    sinew: Vec<Userspace>,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.sinew.clear();
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = self.a.delete();
        let _ = self.b.delete();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_link(ns: &NetNs, ifname: &str, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if sh(ns, &format!("ip link show {ifname}")).is_ok()
            && Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited ({status}) before its device {ifname} appeared");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} made no device {ifname} within 10 s")
}

/// Starts an outside implementation's device `ifname` in `ns`.
fn spawn_device(ns: &NetNs, arm: Arm, ifname: &str) -> anyhow::Result<Child> {
    let mut cmd = match arm {
        Arm::Boringtun => {
            let mut c = command_in(ns, "boringtun-cli")?;
            c.args(["--foreground", "--disable-drop-privileges", ifname]);
            c
        }
        Arm::WireguardGo => {
            let mut c = command_in(ns, "wireguard-go")?;
            c.args(["-f", ifname]);
            c
        }
        _ => unreachable!("only the outside implementations run as processes"),
    };
    cmd.env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {}: install it (boringtun-cli: `cargo install boringtun-cli`; wireguard-go: apt)",
            arm.name()
        )
    })?;
    wait_for_link(ns, ifname, arm.name(), &mut child)?;
    Ok(child)
}

/// Runs `a && b && ...` in `ns`: each step a command line for [`sh`],
/// which has no shell; the first failure stops it.
fn steps(ns: &NetNs, line: &str) -> anyhow::Result<()> {
    for step in line.split("&&").map(str::trim).filter(|s| !s.is_empty()) {
        sh(ns, step)?;
    }
    Ok(())
}

/// Addresses, MTU and route of one side's tunnel device.
fn address(ns: &NetNs, arm: Arm, ifname: &str, me: u8, peer: u8) -> anyhow::Result<()> {
    let i = arm.index();
    steps(
        ns,
        &format!(
            "ip addr add 10.100.{i}.{me}/32 dev {ifname} && ip link set {ifname} mtu {MTU} up && \
             ip route add 10.100.{i}.{peer}/32 dev {ifname}"
        ),
    )?;
    Ok(())
}

fn setup(dir: PathBuf) -> anyhow::Result<Setup> {
    let tag = std::process::id() % 100_000;
    let mut s = Setup {
        a: NetNs::create(format!("swgbench{tag}a"))?,
        b: NetNs::create(format!("swgbench{tag}b"))?,
        procs: Vec::new(),
        sinew: Vec::new(),
        dir,
    };
    std::fs::create_dir_all(&s.dir)?;
    steps(
        &s.a,
        &format!(
            "ip link add ua type veth peer name ub netns {b} && ip addr add {UNDERLAY_A}/24 dev ua && \
             ip link set ua up",
            b = s.b.name()
        ),
    )?;
    steps(
        &s.b,
        &format!("ip addr add {UNDERLAY_B}/24 dev ub && ip link set ub up"),
    )?;

    for arm in [Arm::Sinew, Arm::Boringtun, Arm::WireguardGo] {
        let (ia, ib) = (arm.ifname('a'), arm.ifname('b'));
        let ka = keys(&s.dir, &ia)?;
        let kb = keys(&s.dir, &ib)?;
        match arm {
            Arm::Sinew => {
                for (ns, ifname, mine, theirs, under) in
                    [(&s.a, &ia, &ka, &kb, UNDERLAY_B), (&s.b, &ib, &kb, &ka, UNDERLAY_A)]
                {
                    let private = PrivateKey::parse(&mine.private)?;
                    let peer_ip = if ns.name() == s.a.name() { 2 } else { 1 };
                    let cfg = Config {
                        ifname: ifname.clone(),
                        listen_port: arm.port(),
                        queues: 2,
                    };
                    let dev = ns.run(move || Userspace::start(&cfg, private))??;
                    dev.set_peers(&[PeerConfig {
                        public_key: theirs.public.parse()?,
                        endpoint: SocketAddrV4::new(under, arm.port()),
                        allowed_ips: vec![format!("10.100.{}.{peer_ip}/32", arm.index()).parse()?],
                    }]);
                    s.sinew.push(dev);
                }
            }
            _ => {
                for (ns, ifname, mine, theirs, under, peer_ip) in [
                    (&s.a, &ia, &ka, &kb, UNDERLAY_B, 2),
                    (&s.b, &ib, &kb, &ka, UNDERLAY_A, 1),
                ] {
                    let child = spawn_device(ns, arm, ifname)?;
                    s.procs.push(child);
                    sh(
                        ns,
                        &format!(
                            "wg set {ifname} listen-port {port} private-key {key} peer {peer} endpoint {under}:{port} \
                             allowed-ips 10.100.{i}.{peer_ip}/32",
                            port = arm.port(),
                            key = mine.private_file.display(),
                            peer = theirs.public,
                            i = arm.index(),
                        ),
                    )
                    .with_context(|| format!("wg set {ifname} ({})", arm.name()))?;
                }
            }
        }
        address(&s.a, arm, &ia, 1, 2)?;
        address(&s.b, arm, &ib, 2, 1)?;
        // A first packet through, so the handshake is not in the timing.
        let ping = format!("busybox ping -c1 -W5 {}", arm.server_addr());
        sh(&s.a, &ping).with_context(|| format!("no ping through {} after 5 s", arm.name()))?;
    }
    Ok(s)
}

/// Runs the comparison: `reps` rounds of one iperf3 run (`secs`, one
/// stream) per arm, alternating.
pub fn run(reps: u32, secs: u32, idle_wait: Duration, report: &mut Report) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sinew-wgbench-{}", std::process::id()));
    let s = setup(dir)?;
    let servers = Arm::ALL
        .iter()
        .map(|&arm| IperfServer::start(&s.b, IpAddr::V4(arm.server_addr()), 5201 + u16::from(arm.index())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(note) = idle::wait_for_idle(idle_wait)?.note("wireguard-userspace") {
        report.notes.push(note);
    }
    let mut samples: Vec<Samples> = vec![Samples::default(); Arm::ALL.len()];
    for rep in 0..reps {
        for (i, arm) in Arm::ALL.iter().enumerate() {
            idle::check_interrupted()?;
            let bps = run_client(&s.a, &servers[i], 1, secs)?;
            eprintln!(
                "wireguard-userspace rep {}/{reps}: {:<18} {:.2} Gbit/s",
                rep + 1,
                arm.name(),
                bps / 1e9
            );
            samples[i].push(bps / 1e9);
        }
    }
    let [veth, sinew, boringtun, wggo] = [0, 1, 2, 3].map(|i| samples[i].clone());
    let row = |metric: &str, baseline: &str, base: &Samples| Row {
        scenario: "wireguard userspace".into(),
        metric: metric.into(),
        unit: "Gbit/s",
        better: Better::Higher,
        baseline: baseline.into(),
        baseline_samples: base.clone(),
        sinew_samples: sinew.clone(),
    };
    report
        .rows
        .push(row("iperf3 1 stream", Arm::Boringtun.name(), &boringtun));
    report.rows.push(row("iperf3 1 stream", Arm::WireguardGo.name(), &wggo));
    report.rows.push(row("iperf3 1 stream", Arm::Veth.name(), &veth));
    drop(servers);
    drop(s);
    Ok(())
}
