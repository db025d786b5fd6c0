//! CPU time of the processes a benchmark involves: its own peers (getrusage) and processes it
//! did not fork or has not reaped, such as the NSM and servers' workers (/proc/PID/stat).
//! And `--warm`: keeping CPUs out of deep idle.

/// User + system CPU seconds from getrusage(`who`): RUSAGE_SELF (all threads of this process) or
/// RUSAGE_CHILDREN (reaped children).
pub fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain old data, so all-zero is valid; getrusage only writes into it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU seconds process `pid` has used so far (all its threads).
pub fn process(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("process {pid}: {e}"))?;
    // The command name may contain spaces and parentheses; fields are counted after its last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
    let ticks: Vec<f64> = fields.iter().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // SAFETY: an integer in and out, no memory passed; sysconf cannot misbehave on any name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    match ticks[..] {
        [user, sys] => Ok((user + sys) / hz),
        _ => Err(format!("cannot parse /proc/{pid}/stat")),
    }
}

/// CPU seconds of several processes together; one that has already exited counts as 0.
pub fn processes(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| process(p).ok()).sum()
}

/// While alive, keeps every CPU's idle loop polling instead of halting: a PM QoS request for 0 µs
/// of wake-up latency, in force as long as /dev/cpu_dma_latency stays open with 0 written. The
/// cpuidle governor then picks only state 0 (poll), for every process alike, so a wake-up costs
/// neither a vCPU halt nor the IPI to a halted vCPU. Without a cpuidle driver (`idle_driver()` is
/// None) the kernel's default idle (HLT) ignores the request.
///
/// Busy-looping SCHED_IDLE threads that yield were tried first: on this 2-vCPU VM they lowered
/// native sockperf p50 from 26 to 20 µs, the QoS request to 6.4 µs, since a CPU running a thread
/// still needs an IPI to learn of a wake-up while a polling idle loop sees it at once.
pub struct Awake {
    _qos: std::fs::File,
}

pub fn keep_awake() -> Result<Awake, String> {
    use std::io::Write;
    const PATH: &str = "/dev/cpu_dma_latency";
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(PATH)
        .map_err(|e| format!("--warm: cannot open {PATH} ({e}); it needs root"))?;
    f.write_all(&0i32.to_ne_bytes()).map_err(|e| format!("--warm: writing {PATH}: {e}"))?;
    Ok(Awake { _qos: f })
}

/// The cpuidle driver (e.g. `haltpoll`, `intel_idle`), if the kernel has one.
pub fn idle_driver() -> Option<String> {
    let d = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver").ok()?;
    Some(d.trim().to_string()).filter(|d| !d.is_empty() && d != "none")
}
