//! A UserStack on a real TAP device and on an AF_PACKET socket on a veth, each in a network
//! namespace the test makes for itself (it goes away with the test's thread): Linux's own TCP
//! talks to it both ways, over IPv4 and IPv6. Needs root (CAP_NET_ADMIN) and `ip`; without
//! them it says why and passes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use netkernel_nsm_user::seam::{Ready, Stack};
use netkernel_nsm_user::sockaddr::{self, Family};
use netkernel_nsm_user::{open_packet, open_tap, UserConfig, UserStack};

const TAP: &str = "nkuser0";
const VETH: &str = "nkveth0";
const VETH_PEER: &str = "nkveth1";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn sa(s: &str) -> Vec<u8> {
    let a: SocketAddr = s.parse().unwrap();
    let mut b = vec![0u8; 28];
    let fam = if a.is_ipv4() { Family::V4 } else { Family::V6 };
    let n = sockaddr::write(fam, a, &mut b);
    b.truncate(n);
    b
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
}

/// Sleeps on the stack's fd until it is readable or the stack's deadline (at most 5 ms), then
/// polls it: what the NSM's loop does.
fn step(stack: &mut UserStack, deadline: Option<Instant>) -> Option<Instant> {
    let now = Instant::now();
    let ms = deadline.map_or(5, |d| d.saturating_duration_since(now).as_millis().min(5) as i32);
    let mut p = libc::pollfd { fd: stack.wait_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd for the duration of the call.
    let woken = unsafe { libc::poll(&mut p, 1, ms) } > 0;
    let mut ready: Vec<Ready> = Vec::new();
    stack.poll(Instant::now(), woken, &mut ready)
}

/// An echo server on the user stack for kernel clients at `addrs`, and a user-stack client of
/// a kernel echo server.
fn run_in_namespace(link: &str) -> Result<(), String> {
    ip(&["link", "set", "lo", "up"])?;
    let (fd, kernel_side) = if link == "tap" {
        (open_tap(TAP).map_err(|e| format!("open_tap: {e}"))?, TAP)
    } else {
        ip(&["link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER])?;
        ip(&["link", "set", VETH, "up"])?;
        (open_packet(VETH).map_err(|e| format!("open_packet: {e}"))?, VETH_PEER)
    };
    ip(&["addr", "add", "10.77.0.1/24", "dev", kernel_side])?;
    ip(&["-6", "addr", "add", "fd77::1/64", "dev", kernel_side, "nodad"])?;
    ip(&["link", "set", kernel_side, "up"])?;

    let cfg = UserConfig::parse(link, "10.77.0.2/24", Some("fd77::2/64"), "10.77.0.1", Some("fd77::1"), None)
        .map_err(|e| e.to_string())?;
    let mut stack = UserStack::new(cfg, fd)?;
    let l = stack.socket(libc::AF_INET6, libc::SOCK_STREAM, 0).map_err(|e| format!("socket: {e}"))?;
    stack.bind(&l, &sa("[::]:8080")).map_err(|e| format!("bind: {e}"))?;
    stack.listen(&l, 16).map_err(|e| format!("listen: {e}"))?;

    // Kernel clients (threads inherit this thread's namespace).
    let clients: Vec<_> = ["10.77.0.2:8080", "[fd77::2]:8080"]
        .into_iter()
        .enumerate()
        .map(|(i, to)| {
            std::thread::spawn(move || -> Result<(), String> {
                let data = pattern(300_000, i as u32);
                let to: SocketAddr = to.parse().unwrap();
                let mut s =
                    TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("{to}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let w = {
                    let mut s = s.try_clone().unwrap();
                    let data = data.clone();
                    std::thread::spawn(move || {
                        s.write_all(&data).and_then(|_| s.shutdown(Shutdown::Write)).map_err(|e| e.to_string())
                    })
                };
                let mut back = Vec::new();
                s.read_to_end(&mut back).map_err(|e| format!("{to}: read: {e}"))?;
                w.join().unwrap()?;
                if back != data {
                    return Err(format!("{to}: echoed {} bytes, differing from the {} sent", back.len(), data.len()));
                }
                Ok(())
            })
        })
        .collect();

    // A kernel echo server the user stack connects to.
    let kl = TcpListener::bind("10.77.0.1:9090").map_err(|e| format!("kernel listen: {e}"))?;
    let ks = std::thread::spawn(move || -> Result<(), String> {
        let (mut c, peer) = kl.accept().map_err(|e| e.to_string())?;
        if peer.ip().to_string() != "10.77.0.2" {
            return Err(format!("kernel saw the user stack as {peer}"));
        }
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        c.write_all(&buf).map_err(|e| e.to_string())?;
        Ok(())
    });
    let out = stack.socket(libc::AF_INET, libc::SOCK_STREAM, 0).map_err(|e| format!("socket: {e}"))?;
    match stack.connect(&out, &sa("10.77.0.1:9090")) {
        Err(libc::EINPROGRESS) => {}
        r => return Err(format!("connect: {r:?}")),
    }
    let up = pattern(200_000, 9);
    let (mut up_sent, mut down, mut up_closed) = (0usize, Vec::new(), false);

    let mut conns: Vec<(netkernel_nsm_user::Handle, Vec<u8>, bool, bool)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    let mut deadline = None;
    loop {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("ip").args(["-s", "link"]).status();
            let _ = Command::new("ip").args(["neigh"]).status();
            return Err(format!(
                "timed out: {} echo connections, {} of {} bytes back from the kernel; wire tx/rx/dropped {:?}",
                conns.len(),
                down.len(),
                up.len(),
                stack.wire_counters()
            ));
        }
        deadline = step(&mut stack, deadline);
        let mut pa = [0u8; 28];
        while let Ok((s, _)) = stack.accept(&l, &mut pa) {
            conns.push((s, Vec::new(), false, false));
        }
        for (s, pending, eof, shut) in conns.iter_mut() {
            loop {
                match stack.recv(s, &mut buf, 0, &mut []) {
                    Ok((0, _)) => {
                        *eof = true;
                        break;
                    }
                    Ok((n, _)) => pending.extend_from_slice(&buf[..n]),
                    Err(libc::EAGAIN) => break,
                    Err(e) => return Err(format!("echo recv: errno {e}")),
                }
            }
            while !pending.is_empty() {
                match stack.send(s, pending, 0, &[]) {
                    Ok(n) => drop(pending.drain(..n)),
                    Err(libc::EAGAIN) => break,
                    Err(e) => return Err(format!("echo send: errno {e}")),
                }
            }
            if *eof && pending.is_empty() && !*shut {
                stack.shutdown(s, libc::SHUT_WR).map_err(|e| format!("shutdown: {e}"))?;
                *shut = true;
            }
        }
        // The user-stack client: connected once the mask says writable.
        if stack.poll_mask(&out) & libc::POLLOUT as u32 != 0 {
            let _ = stack.connect(&out, &sa("10.77.0.1:9090"));
            while up_sent < up.len() {
                match stack.send(&out, &up[up_sent..], 0, &[]) {
                    Ok(n) => up_sent += n,
                    Err(libc::EAGAIN) => break,
                    Err(e) => return Err(format!("client send: errno {e}")),
                }
            }
            if up_sent == up.len() && !up_closed {
                stack.shutdown(&out, libc::SHUT_WR).map_err(|e| format!("client shutdown: {e}"))?;
                up_closed = true;
            }
            while let Ok((n, _)) = stack.recv(&out, &mut buf, 0, &mut []) {
                if n == 0 {
                    break;
                }
                down.extend_from_slice(&buf[..n]);
            }
        }
        if clients.iter().all(|c| c.is_finished()) && ks.is_finished() && down.len() >= up.len() {
            break;
        }
    }
    for c in clients {
        c.join().unwrap()?;
    }
    ks.join().unwrap()?;
    if down != up {
        return Err(format!("kernel echoed {} bytes differing from the {} sent", down.len(), up.len()));
    }
    Ok(())
}

fn in_private_namespace(name: &str, link: &'static str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {name}: needs root to make a network namespace and a {link} link");
        return;
    }
    let r = std::thread::spawn(move || {
        // A network namespace for this thread alone: the link, its addresses and the kernel
        // sockets exist only there, and the namespace dies with the thread and its children.
        // SAFETY: unshare has no memory preconditions; CLONE_NEWNET may be unshared by one
        // thread of a multi-threaded process.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("SKIP: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        run_in_namespace(link)
    })
    .join()
    .unwrap();
    match r {
        Err(e) if e.starts_with("SKIP") || e.starts_with("ip: ") || e.starts_with("open_") => {
            eprintln!("SKIPPED {name}: {e}");
        }
        r => r.unwrap(),
    }
}

#[test]
fn kernel_tcp_talks_to_user_stack_over_tap() {
    in_private_namespace("kernel_tcp_talks_to_user_stack_over_tap", "tap");
}

#[test]
fn kernel_tcp_talks_to_user_stack_over_af_packet_on_veth() {
    in_private_namespace("kernel_tcp_talks_to_user_stack_over_af_packet_on_veth", "packet");
}
