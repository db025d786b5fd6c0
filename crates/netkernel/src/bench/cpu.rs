//! CPU time of the processes a benchmark involves: its own peers (getrusage) and processes it
//! did not fork or has not reaped, such as the NSM and servers' workers (/proc/PID/stat).

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
