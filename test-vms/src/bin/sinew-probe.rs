//! sinew-probe: a small client for lab tests, run inside a pod or node
//! (and so inside its cgroup, where socket load balancing applies). It
//! prints what an application sees: the peer address from getpeername (TCP)
//! or the source address from recvfrom (UDP), and the server's first line.
//!
//! ```text
//! sinew-probe tcp ADDR:PORT [--count N] [--bind-port P] [--timeout-ms T] [--v6]
//! sinew-probe udp ADDR:PORT [--count N] [--timeout-ms T] [--v6]
//! sinew-probe tcp-hold ADDR:PORT [--timeout-ms T]   # then echoes stdin lines
//! sinew-probe sctp ADDR:PORT [--count N] [--timeout-ms T]
//! sinew-probe sctp-serve ADDR:PORT   # prints `listening`, then answers each
//!                                    # association with `sctp LOCAL`
//! sinew-probe http ADDR:PORT [--path P] [--http10] [--count N] [--timeout-ms T]
//! ```
//!
//! SCTP uses one-to-one style sockets (SOCK_STREAM, IPPROTO_SCTP); the
//! kernel needs the sctp module.
//!
//! One line per connection or datagram: `ok peer=A:P local=A:P reply=TEXT`
//! or `err errno=N msg=TEXT`. With `--bind-port P` connection i binds source
//! port P+i first and closes with a reset (no TIME_WAIT), so the same ports
//! can be used again. `--v6` uses an IPv6 socket and the IPv4-mapped
//! address (::ffff:ADDR), as dual-stack runtimes do.
//!
//! `http` sends `GET P` (default `/`) and reads the answer until the server
//! closes: `ok status=N peer=A:P local=A:P body=TEXT` (TEXT is the rest of
//! the line, the body's first line). HTTP/1.1 with `Connection: close` by
//! default; `--http10` sends an HTTP/1.0 request without Host and shuts
//! down its sending side right after it (a half-close, as `nc -N` and
//! HTTP/1.0 clients do), so the answer must come over a half-closed
//! connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

struct Opts {
    addr: SocketAddrV4,
    count: u32,
    bind_port: Option<u16>,
    timeout: Duration,
    v6: bool,
    path: String,
    http10: bool,
}

impl Opts {
    /// Where to connect or send: the address, or its IPv4-mapped form.
    fn target(&self) -> SocketAddr {
        if self.v6 {
            SocketAddr::V6(std::net::SocketAddrV6::new(
                self.addr.ip().to_ipv6_mapped(),
                self.addr.port(),
                0,
                0,
            ))
        } else {
            SocketAddr::V4(self.addr)
        }
    }
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let addr = args
        .first()
        .ok_or("missing ADDR:PORT")?
        .parse()
        .map_err(|e| format!("ADDR:PORT: {e}"))?;
    let mut o = Opts {
        addr,
        count: 1,
        bind_port: None,
        timeout: Duration::from_secs(3),
        v6: false,
        path: "/".into(),
        http10: false,
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        if flag == "--v6" {
            o.v6 = true;
            continue;
        }
        if flag == "--http10" {
            o.http10 = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--count" => o.count = v.parse().map_err(|_| "--count: a number")?,
            "--bind-port" => o.bind_port = Some(v.parse().map_err(|_| "--bind-port: a port")?),
            "--path" => o.path = v.clone(),
            "--timeout-ms" => o.timeout = Duration::from_millis(v.parse().map_err(|_| "--timeout-ms: a number")?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(o)
}

fn err_line(e: &std::io::Error) -> String {
    format!("err errno={} msg={e}", e.raw_os_error().unwrap_or(0))
}

fn connect(o: &Opts, i: u32) -> std::io::Result<TcpStream> {
    let Some(base) = o.bind_port else {
        return TcpStream::connect_timeout(&o.target(), o.timeout);
    };
    let fd = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let port = base
        .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
        .ok_or_else(|| std::io::Error::other("bind port out of range"))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new([0, 0, 0, 0].into(), port)),
    )?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(o.addr))?;
    let s = TcpStream::from(fd);
    // Close with a reset: no TIME_WAIT, so a later run can reuse the port.
    socket::setsockopt(
        &s,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    Ok(s)
}

fn tcp(o: &Opts) -> bool {
    let mut all_ok = true;
    for i in 0..o.count {
        let line = (|| -> std::io::Result<String> {
            let s = connect(o, i)?;
            s.set_read_timeout(Some(o.timeout))?;
            let peer = s.peer_addr()?;
            let local = s.local_addr()?;
            let mut reply = String::new();
            BufReader::new(&s).read_line(&mut reply)?;
            Ok(format!("ok peer={peer} local={local} reply={}", reply.trim()))
        })()
        .unwrap_or_else(|e| {
            all_ok = false;
            err_line(&e)
        });
        println!("{line}");
    }
    all_ok
}

fn udp(o: &Opts) -> bool {
    let mut all_ok = true;
    for i in 0..o.count {
        let line = (|| -> std::io::Result<String> {
            let s = UdpSocket::bind(if o.v6 { "[::]:0" } else { "0.0.0.0:0" })?;
            s.set_read_timeout(Some(o.timeout))?;
            s.send_to(format!("ping{i}").as_bytes(), o.target())?;
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(format!(
                "ok peer={from} local={} reply={}",
                s.local_addr()?,
                String::from_utf8_lossy(&buf[..n]).trim()
            ))
        })()
        .unwrap_or_else(|e| {
            all_ok = false;
            err_line(&e)
        });
        println!("{line}");
    }
    all_ok
}

/// One connection kept open: prints the first line, then sends each stdin
/// line and prints the echo, until stdin closes.
fn tcp_hold(o: &Opts) -> bool {
    let run = || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&o.target(), o.timeout)?;
        s.set_read_timeout(Some(o.timeout))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut first = String::new();
        r.read_line(&mut first)?;
        println!(
            "ok peer={} local={} reply={}",
            s.peer_addr()?,
            s.local_addr()?,
            first.trim()
        );
        std::io::stdout().flush()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            s.write_all(format!("{line}\n").as_bytes())?;
            let mut echo = String::new();
            r.read_line(&mut echo)?;
            println!("echo {}", echo.trim());
            std::io::stdout().flush()?;
        }
        let mut rest = Vec::new();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read_to_end(&mut rest);
        Ok(())
    };
    match run() {
        Ok(()) => true,
        Err(e) => {
            println!("{}", err_line(&e));
            false
        }
    }
}

/// One HTTP GET per connection; see the module documentation.
fn http(o: &Opts) -> bool {
    let mut all_ok = true;
    for _ in 0..o.count {
        let line = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&o.target(), o.timeout)?;
            s.set_read_timeout(Some(o.timeout))?;
            let peer = s.peer_addr()?;
            let local = s.local_addr()?;
            if o.http10 {
                s.write_all(format!("GET {} HTTP/1.0\r\n\r\n", o.path).as_bytes())?;
                s.shutdown(std::net::Shutdown::Write)?;
            } else {
                s.write_all(
                    format!(
                        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                        o.path, o.addr
                    )
                    .as_bytes(),
                )?;
            }
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            let text = String::from_utf8_lossy(&raw);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("no complete response head in {} bytes", raw.len()),
                ));
            };
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status code"))?;
            let first = body.lines().next().unwrap_or_default();
            Ok(format!("ok status={status} peer={peer} local={local} body={first}"))
        })()
        .unwrap_or_else(|e| {
            all_ok = false;
            err_line(&e)
        });
        println!("{line}");
    }
    all_ok
}

/// A one-to-one style SCTP socket.
fn sctp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) {
            std::io::Error::new(e.kind(), format!("{e} (no SCTP in this kernel: modprobe sctp)"))
        } else {
            e
        });
    }
    // SAFETY: fd is a descriptor socket(2) just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects an association, reads the server's first line.
fn sctp(o: &Opts) -> bool {
    let mut all_ok = true;
    for _ in 0..o.count {
        let line = (|| -> std::io::Result<String> {
            let fd = sctp_socket()?;
            let tv = nix::sys::time::TimeVal::new(
                o.timeout.as_secs() as libc::time_t,
                o.timeout.subsec_micros() as libc::suseconds_t,
            );
            // A blocking connect waits for the association at most this long.
            socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
            socket::connect(fd.as_raw_fd(), &SockaddrIn::from(o.addr))?;
            let s = TcpStream::from(fd);
            s.set_read_timeout(Some(o.timeout))?;
            let peer = s.peer_addr()?;
            let local = s.local_addr()?;
            let mut reply = String::new();
            BufReader::new(&s).read_line(&mut reply)?;
            if reply.is_empty() {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no reply"));
            }
            Ok(format!("ok peer={peer} local={local} reply={}", reply.trim()))
        })()
        .unwrap_or_else(|e| {
            all_ok = false;
            err_line(&e)
        });
        println!("{line}");
    }
    all_ok
}

/// Serves SCTP associations until killed.
fn sctp_serve(o: &Opts) -> bool {
    let run = || -> std::io::Result<()> {
        let fd = sctp_socket()?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn::from(o.addr))?;
        socket::listen(&fd, socket::Backlog::new(64).map_err(std::io::Error::from)?)?;
        let listener = std::net::TcpListener::from(fd);
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let local = s.local_addr()?;
            let _ = s.write_all(format!("sctp {local}\n").as_bytes());
            // Wait for the client to close first: the reply is then read
            // before the association goes away.
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut [0u8; 16]);
        }
        Ok(())
    };
    match run() {
        Ok(()) => true,
        Err(e) => {
            println!("{}", err_line(&e));
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("usage: sinew-probe tcp|udp|tcp-hold|sctp|sctp-serve|http ADDR:PORT [--count N] [--bind-port P] [--timeout-ms T] [--path P] [--http10]");
        std::process::exit(2);
    };
    let o = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sinew-probe: {e}");
            std::process::exit(2);
        }
    };
    let ok = match mode.as_str() {
        "tcp" => tcp(&o),
        "udp" => udp(&o),
        "tcp-hold" => tcp_hold(&o),
        "sctp" => sctp(&o),
        "sctp-serve" => sctp_serve(&o),
        "http" => http(&o),
        other => {
            eprintln!("sinew-probe: unknown mode {other}: use tcp, udp, tcp-hold, sctp, sctp-serve or http");
            std::process::exit(2);
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}
