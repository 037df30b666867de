//! What the benchmark reads from /proc: memory, CPU time and TCP
//! connections of the processes it watches (Linux only; on other systems
//! every figure reads as zero).

use std::collections::HashSet;
use std::fs;
use std::sync::OnceLock;

/// Clock ticks per second of /proc/<pid>/stat's utime and stime
/// (`getconf CLK_TCK`; 100 on every common Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) the process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields are counted
    // after its closing parenthesis. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// A `Vm...:` line of /proc/<pid>/status, in kB.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident memory now, kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

/// Peak resident memory since the process started, kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// Inodes of the sockets the process holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return inodes;
    };
    for entry in dir.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let target = target.to_string_lossy();
            if let Some(n) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
            {
                inodes.insert(n);
            }
        }
    }
    inodes
}

/// One ESTABLISHED row of /proc/net/tcp{,6}.
struct TcpRow {
    remote_port: u16,
    inode: u64,
}

fn established_rows() -> Vec<TcpRow> {
    let mut rows = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            let remote_port = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let inode = f[9].parse().ok();
            if let (Some(remote_port), Some(inode)) = (remote_port, inode) {
                rows.push(TcpRow { remote_port, inode });
            }
        }
    }
    rows
}

/// Established TCP connections held by `pids`, in total and those whose
/// remote side is `port` (connections to the CouchDB server).
pub fn connections(pids: &[u32], port: u16) -> (usize, usize) {
    let mut inodes = HashSet::new();
    for pid in pids {
        inodes.extend(socket_inodes(*pid));
    }
    let rows = established_rows();
    let mine: Vec<&TcpRow> = rows.iter().filter(|r| inodes.contains(&r.inode)).collect();
    let to_port = mine.iter().filter(|r| r.remote_port == port).count();
    (mine.len(), to_port)
}
