//! `netkernel demo`: an unmodified HTTP server (python3 -m http.server) and client (curl), both
//! served by a kernel NSM through a private engine, then the same natively, side by side.

use crate::guestlib::{self, which};
use crate::tempengine::TempEngine;
use netkernel_control::EngineRequest;
use netkernel_engine::request;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn sha256(p: &Path) -> Result<String, String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    std::io::copy(&mut f, &mut h).map_err(|e| e.to_string())?;
    Ok(format!("{:x}", h.finalize()))
}

/// Starts the HTTP server and waits for its banner.
fn start_server(mut cmd: Command, dir: &Path) -> Result<Child, String> {
    cmd.current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("starting python3: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("Serving HTTP") {
        let _ = child.kill();
        return Err(format!("http.server did not start: {line:?}"));
    }
    Ok(child)
}

/// Downloads the file with curl; returns seconds taken.
fn fetch(mut cmd: Command) -> Result<f64, String> {
    let start = Instant::now();
    let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
    if !out.status.success() {
        return Err(format!("curl failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(start.elapsed().as_secs_f64())
}

struct Run {
    secs: f64,
    ok: bool,
}

fn one_run(
    engine: Option<(&Path, &Path)>,
    python: &str,
    curl: &str,
    www: &Path,
    port: u16,
    out: &Path,
    want: &str,
) -> Result<Run, String> {
    let cmd = |program: &str, args: &[String]| match engine {
        Some((lib, socket)) => guestlib::command(lib, socket, None, program, args),
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    let server_args: Vec<String> =
        ["-u", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"].map(String::from).to_vec();
    let mut server = start_server(cmd(python, &server_args), www)?;
    let url = format!("http://127.0.0.1:{port}/payload.bin");
    let r = fetch(cmd(curl, &["-sS".into(), "-o".into(), out.display().to_string(), url]));
    let _ = server.kill();
    let _ = server.wait();
    let secs = r?;
    Ok(Run { secs, ok: sha256(out)? == want })
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

fn run(bytes: u64) -> Result<(), String> {
    let python = which("python3")?;
    let curl = which("curl")?;
    let lib = guestlib::find()?;
    let engine = TempEngine::start()?;
    println!("NetKernel demo: python3 -m http.server and curl, unmodified, their sockets served by a kernel NSM");
    println!("(both are guests of that NSM, so their connection takes the co-located short cut)");
    println!("engine socket {}", engine.socket().display());
    let www = engine.dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| e.to_string())?;
    let payload = www.join("payload.bin");
    let mut data = vec![0u8; bytes as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ bytes;
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    std::fs::write(&payload, &data).map_err(|e| e.to_string())?;
    drop(data);
    let want = sha256(&payload)?;
    let out = engine.dir.join("download.bin");

    let nk = one_run(Some((&lib, engine.socket())), &python, &curl, &www, free_port()?, &out, &want)?;
    let nsms = request(engine.socket(), &EngineRequest::Nsms)?;
    let native = one_run(None, &python, &curl, &www, free_port()?, &out, &want)?;

    let mib = bytes as f64 / (1 << 20) as f64;
    println!();
    for n in nsms.as_array().into_iter().flatten() {
        println!(
            "NSM {} ({} stack, congestion {}, pid {}): {} connection(s) ({} co-located), {} bytes in, {} bytes out",
            n["name"].as_str().unwrap_or("?"),
            n["kind"].as_str().unwrap_or("?"),
            n["congestion"].as_str().unwrap_or("?"),
            n["pid"],
            n["conns_total"],
            n["conns_colocated"],
            n["bytes_in"],
            n["bytes_out"]
        );
    }
    println!();
    // Server and client are guests of one NSM: by default their connection is co-located.
    let label = if nsms[0]["conns_colocated"].as_u64().unwrap_or(0) > 0 {
        "NetKernel (co-located)"
    } else {
        "NetKernel (kernel NSM)"
    };
    println!("{:<23} {:>10} {:>12} {:>10}", "path", "seconds", "MiB/s", "sha256");
    for (name, r) in [(label, &nk), ("native kernel sockets", &native)] {
        println!("{name:<23} {:>10.3} {:>12.1} {:>10}", r.secs, mib / r.secs, if r.ok { "match" } else { "MISMATCH" });
    }
    println!("NetKernel / native throughput: {:.2}x", native.secs / nk.secs);
    if !(nk.ok && native.ok) {
        return Err("downloaded bytes differ from the file served".into());
    }
    let moved = nsms[0]["bytes_out"].as_u64().unwrap_or(0);
    if moved < bytes {
        return Err(format!("the NSM counted only {moved} bytes out of {bytes}: traffic bypassed NetKernel"));
    }
    Ok(())
}

pub fn main(bytes: u64) -> i32 {
    match run(bytes) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("netkernel demo: {e}");
            1
        }
    }
}
