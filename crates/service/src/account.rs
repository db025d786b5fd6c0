//! What the NSM's CPU was spent on, per tenant.
//!
//! Reading a thread's CPU clock is a system call (about 0.8 µs on this project's VMs), too dear
//! for every task. So each task is timed with the monotonic clock (tens of nanoseconds), and the
//! thread's CPU clock is read once per millisecond of task time: the CPU the thread used since
//! the last reading is divided among the tenants in proportion to their tasks' time. Time the
//! thread was preempted is thus nobody's, and the loop's own work (polling, spinning before it
//! sleeps) is shared by the tenants it ran for. CPU used while no task ran at all is overhead.
//! The tenants' sum plus overhead is the thread's CPU time exactly.

use crate::sched::{CpuCap, TenantId};
use std::collections::HashMap;
use std::time::Duration;

/// How much task time may gather before the thread's CPU clock is read.
pub(crate) const SETTLE_EVERY: Duration = Duration::from_millis(1);

pub(crate) struct TenantCpu {
    pub name: String,
    pub weight: u32,
    pub cap: Option<CpuCap>,
    /// CPU attributed to the tenant so far.
    pub cpu: Duration,
    /// Its tasks' time since the last settle.
    pending: Duration,
}

#[derive(Default)]
pub(crate) struct Accounting {
    pub tenants: Vec<TenantCpu>,
    ids: HashMap<String, TenantId>,
    /// The thread's CPU clock at the last settle.
    mark: Duration,
    /// All tenants' task time since then.
    pending: Duration,
    /// CPU the thread used while no tenant's task ran.
    pub overhead: Duration,
}

impl Accounting {
    /// The tenant's number, given on first sight.
    pub(crate) fn id(&mut self, name: &str) -> TenantId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.tenants.len() as TenantId;
        self.tenants.push(TenantCpu {
            name: name.to_string(),
            weight: 1,
            cap: None,
            cpu: Duration::ZERO,
            pending: Duration::ZERO,
        });
        self.ids.insert(name.to_string(), id);
        id
    }

    /// A task of `tenant` took `took`.
    pub(crate) fn record(&mut self, tenant: TenantId, took: Duration) {
        if let Some(t) = self.tenants.get_mut(tenant as usize) {
            t.pending += took;
            self.pending += took;
        }
    }

    /// Whether enough task time gathered that the driver should read the CPU clock.
    pub(crate) fn due(&self) -> bool {
        self.pending >= SETTLE_EVERY
    }

    /// Divides the CPU the thread used since the last call (`thread_cpu`: its CPU clock now)
    /// among the tenants whose tasks ran, by their tasks' time.
    pub(crate) fn settle(&mut self, thread_cpu: Duration) {
        let used = thread_cpu.saturating_sub(self.mark);
        self.mark = thread_cpu;
        if self.pending.is_zero() {
            self.overhead += used;
            return;
        }
        let total = self.pending.as_nanos();
        let mut given = Duration::ZERO;
        let last = self.tenants.iter().rposition(|t| !t.pending.is_zero());
        for (i, t) in self.tenants.iter_mut().enumerate() {
            if t.pending.is_zero() {
                continue;
            }
            // The last one takes the remainder, so rounding loses no nanosecond.
            let share = if Some(i) == last {
                used.saturating_sub(given)
            } else {
                Duration::from_nanos((used.as_nanos() * t.pending.as_nanos() / total) as u64)
            };
            given += share;
            t.cpu += share;
            t.pending = Duration::ZERO;
        }
        self.pending = Duration::ZERO;
    }
}

/// The calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID).
pub(crate) fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a live local the call writes; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_divided_by_task_time_and_nothing_is_lost() {
        let mut a = Accounting::default();
        let (x, y) = (a.id("x"), a.id("y"));
        assert_eq!(a.id("x"), x);
        a.record(x, Duration::from_micros(100));
        a.record(y, Duration::from_micros(300));
        assert!(!a.due());
        // The thread used 1 ms over that time (preemption excluded, loop overhead included).
        a.settle(Duration::from_micros(1000));
        assert_eq!(a.tenants[x as usize].cpu, Duration::from_micros(250));
        assert_eq!(a.tenants[y as usize].cpu, Duration::from_micros(750));
        // Nothing ran: the loop's CPU is overhead.
        a.settle(Duration::from_micros(1100));
        assert_eq!(a.overhead, Duration::from_micros(100));
        // Awkward ratios still add up to the thread's CPU.
        for _ in 0..3 {
            a.record(x, Duration::from_nanos(1));
            a.record(y, Duration::from_nanos(2));
        }
        a.settle(Duration::from_micros(2100));
        let sum: Duration = a.tenants.iter().map(|t| t.cpu).sum::<Duration>() + a.overhead;
        assert_eq!(sum, Duration::from_micros(2100));
    }

    #[test]
    fn thread_cpu_advances_with_work() {
        let t0 = thread_cpu();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu() > t0);
    }
}
