//! The raw nqe queue, without sockets: a producer thread copies a record into a region's buffer
//! pool and pushes its index on the region's job ring; a consumer thread, with a second mapping
//! of the same memfd (as the NSM has), pops the index and copies the record out. This is what
//! every guest call costs at the least, and what the NetKernel paper measured.
//!
//! Two figures per record size: the time per record and the bandwidth while the ring is kept
//! full (both copies overlap on the two sides, as in the paper's "random read and copy"), and the
//! one-way latency of a single record on an otherwise idle ring (push to copied out, measured
//! with CLOCK_MONOTONIC, which includes one clock read of ~20 ns).

use super::quantile;
use netkernel_ring::region::Region;
use netkernel_ring::spsc::Consumer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One step of a wait for the other side. The queue is measured with spinning waits, not with
/// NetKernel's own (`sys::relax`, which yields every 16 steps to a peer that may share the CPU):
/// those add a system call to many waits and would measure the scheduler. It yields after ~1000
/// steps (microseconds), so that producer and consumer confined to one CPU (taskset, or another
/// process holding the other CPU) still take turns instead of spinning out their time slices.
fn relax(step: u32) {
    if step < 1 << 10 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Record sizes measured; the paper's sizes plus 256 B.
pub const SIZES: [usize; 7] = [64, 256, 512, 1024, 2048, 4096, 8192];

/// The paper's per-record time (ns) for a size, where it gives one (NetKernel, slide 15: "random
/// read and copy" between ServiceLib and GuestLib, QEMU/KVM on a Xeon E5-2618L v3).
fn paper_ns(size: usize) -> Option<f64> {
    match size {
        64 => Some(8.0),
        512 => Some(64.0),
        1024 => Some(117.0),
        2048 => Some(214.0),
        4096 => Some(425.0),
        8192 => Some(809.0),
        _ => None,
    }
}

/// Record buffers in the pool, used round robin. The ring holds at most 64 indices, so with
/// twice as many buffers the producer never writes one the consumer may still be copying out.
const BUFFERS: u64 = 128;

struct Sides {
    producer: Region,
    consumer: Region,
}

impl Sides {
    fn new() -> Result<Sides, String> {
        let producer = Region::create(0).map_err(|e| format!("creating a region for the queue bench: {e}"))?;
        let fd = producer.fd().ok_or("the new region has no memfd")?;
        let consumer = Region::map(fd).map_err(|e| format!("mapping the queue bench's region again: {e}"))?;
        Ok(Sides { producer, consumer })
    }

    fn offset(&self, seq: u64, size: usize) -> u64 {
        self.producer.layout().pool_off + (seq % BUFFERS) * size as u64
    }
}

/// Copies `rec` into the producer's pool at record `seq`'s buffer and pushes it.
fn send(s: &Sides, seq: u64, rec: &[u8]) {
    let off = s.offset(seq, rec.len());
    let dst = s.producer.pool_ptr(off, rec.len() as u32);
    // SAFETY: pool_ptr checked that the record lies in the pool; no other thread touches this
    // buffer until its index has been pushed and popped (see BUFFERS).
    unsafe { std::ptr::copy_nonoverlapping(rec.as_ptr(), dst, rec.len()) };
    let ring = s.producer.ring();
    let mut step = 0;
    while ring.push((seq % BUFFERS) as u32).is_err() {
        relax(step);
        step = step.saturating_add(1);
    }
}

/// Pops the next record into `out`; checks it is record `seq`.
fn receive(s: &Sides, c: &mut Consumer, seq: u64, out: &mut [u8]) -> Result<(), String> {
    let mut step = 0;
    let idx = loop {
        match c.pop() {
            Ok(Some(i)) => break i as u64,
            Ok(None) => relax(step),
            Err(e) => return Err(format!("queue bench: ring corrupt: {e:?}")),
        }
        step = step.saturating_add(1);
    };
    if idx != seq % BUFFERS {
        return Err(format!("queue bench: record {seq} arrived as buffer {idx}"));
    }
    let src = s.consumer.pool_ptr(s.offset(seq, out.len()), out.len() as u32);
    // SAFETY: in the pool (checked); the producer does not write this buffer again before
    // BUFFERS - 64 more records have been popped.
    unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
    match out[..8].try_into().map(u64::from_le_bytes) {
        Ok(stamp) if stamp == seq => Ok(()),
        _ => Err(format!("queue bench: record {seq} arrived with other contents")),
    }
}

/// Records per size for the streaming measurement: about `bytes` in all, within sane bounds.
fn stream_count(size: usize, bytes: u64) -> u64 {
    (bytes / size as u64).clamp(10_000, 4_000_000)
}

/// Streams `n` records of `size` bytes; returns the consumer's elapsed seconds.
fn stream(s: &Sides, size: usize, n: u64) -> Result<f64, String> {
    let ready = std::sync::Barrier::new(2);
    std::thread::scope(|sc| {
        let producer = sc.spawn(|| {
            let mut rec = vec![0x3cu8; size];
            ready.wait();
            for seq in 0..n {
                rec[..8].copy_from_slice(&seq.to_le_bytes());
                send(s, seq, &rec);
            }
        });
        let mut c = Consumer::new(s.consumer.ring());
        let mut out = vec![0u8; size];
        ready.wait();
        let t = Instant::now();
        let r = (0..n).try_for_each(|seq| receive(s, &mut c, seq, &mut out));
        let secs = t.elapsed().as_secs_f64();
        producer.join().map_err(|_| "queue bench: producer panicked".to_string())?;
        r.map(|()| secs)
    })
}

/// One record at a time on an idle ring; returns sorted one-way latencies in ns. The sequence
/// numbers continue from `first`, so the ring and buffers carry on from the streaming run.
fn one_way(s: &Sides, size: usize, first: u64, samples: u64) -> Result<Vec<u64>, String> {
    let base = Instant::now();
    let received = AtomicU64::new(first);
    let mut lat = std::thread::scope(|sc| {
        let producer = sc.spawn(|| {
            let mut rec = vec![0x3cu8; size];
            for seq in first..first + samples {
                let mut step = 0;
                // The next record leaves only once the last has been copied out: an idle ring.
                while received.load(Ordering::Acquire) < seq {
                    relax(step);
                    step = step.saturating_add(1);
                }
                rec[..8].copy_from_slice(&seq.to_le_bytes());
                rec[8..16].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
                send(s, seq, &rec);
            }
        });
        let mut c = Consumer::resume(s.consumer.ring(), first as u32);
        let mut out = vec![0u8; size];
        let mut lat = Vec::with_capacity(samples as usize);
        let r = (first..first + samples).try_for_each(|seq| {
            receive(s, &mut c, seq, &mut out)?;
            let now = base.elapsed().as_nanos() as u64;
            let sent = u64::from_le_bytes(out[8..16].try_into().map_err(|_| "record shorter than 16 bytes")?);
            lat.push(now.saturating_sub(sent));
            received.store(seq + 1, Ordering::Release);
            Ok::<(), String>(())
        });
        if r.is_err() {
            // Let the producer run out instead of waiting for records that will never be taken.
            received.store(u64::MAX, Ordering::Release);
        }
        producer.join().map_err(|_| "queue bench: producer panicked".to_string())?;
        r.map(|()| lat)
    })?;
    lat.sort_unstable();
    Ok(lat)
}

/// The queue table: per record size, streaming time per record and bandwidth, one-way latency,
/// and the paper's figure where it has one.
pub fn run(bytes_per_size: u64, latency_samples: u64) -> Result<Value, String> {
    let mut rows = Vec::new();
    for size in SIZES {
        let s = Sides::new()?;
        let n = stream_count(size, bytes_per_size);
        let secs = stream(&s, size, n)?;
        let lat = one_way(&s, size, n, latency_samples.max(1))?;
        let ns = secs * 1e9 / n as f64;
        rows.push(json!({
            "bytes": size, "records": n, "ns_per_record": ns, "gbps": size as f64 * 8.0 / ns,
            "one_way_p50_ns": quantile(&lat, 0.5), "one_way_p99_ns": quantile(&lat, 0.99),
            "paper_ns": paper_ns(size), "paper_gbps": paper_ns(size).map(|p| size as f64 * 8.0 / p),
        }));
    }
    Ok(Value::Array(rows))
}
