//! Measuring helpers: settings from the environment, CPU time of a thread or the process,
//! the machine's busy cores (/proc/stat), the load average, thread affinity, percentiles.

use std::time::Duration;

use super::BenchError;

/// An integer setting: `name` from the environment, else `default`.
pub fn env_u64(name: &str, default: u64) -> Result<u64, BenchError> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(format!("{name}: {e}").into()),
    }
}

/// A number setting: `name` from the environment, else `default`.
pub fn env_f64(name: &str, default: f64) -> Result<f64, BenchError> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(format!("{name}: {e}").into()),
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes into a zeroed plain C struct on our stack.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (user + system) the calling thread has used (`RUSAGE_THREAD`).
pub fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

/// CPU time (user + system) this process has used, all threads (`RUSAGE_SELF`).
pub fn process_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// The machine's CPUs (counted before anything was pinned).
pub fn machine_cpus() -> usize {
    super::cpus()
}

/// Lets the calling thread run on every CPU again (threads inherit their creator's
/// affinity: a thread started from a pinned one is pinned too).
pub fn unpin_thread() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..super::cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("unpin_thread: sched_setaffinity failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// The machine's CPU time so far, all CPUs, in clock ticks (the `cpu` line of /proc/stat).
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    /// Now (`None` without /proc/stat).
    pub fn now() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is within user).
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        let total: u64 = f.iter().take(8).sum();
        Some(MachineCpu { busy: total - idle, total })
    }

    /// How many CPUs were busy on average since `earlier` (0 to the CPU count), counting
    /// every process on the machine.
    pub fn busy_cpus_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64 * super::cpus() as f64
    }
}

/// The nearest-rank percentile `q` (0 to 1) of sorted samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
