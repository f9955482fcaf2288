//! CPU time and memory of the processes under test, read from /proc while a load runs.
//! CPU is the sum of every thread's on-CPU nanoseconds (`/proc/PID/task/TID/schedstat`, user and
//! system together, nanosecond resolution, unlike the 10 ms ticks of `/proc/PID/stat`). Memory is
//! the resident set summed over the watched processes (nginx: master and workers), sampled every
//! few milliseconds; the peak of that sum is reported.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// `root` and its direct children (nginx's workers are children of its master).
pub fn family(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_of(pid) == Some(root) {
            pids.push(pid);
        }
    }
    pids
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// On-CPU nanoseconds of all threads of `pids`.
pub fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("schedstat");
            if let Ok(text) = fs::read_to_string(path) {
                total += text
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Resident set of `pids` in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Watches processes while a load runs.
pub struct Watch {
    pids: Vec<u32>,
    cpu_at_start: u64,
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
}

/// What a watch saw.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu_ns: u64,
    pub peak_rss_kib: u64,
}

impl Watch {
    pub fn start(pids: Vec<u32>) -> std::io::Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_at_start = cpu_ns(&pids);
        let sampler = {
            let (pids, stop) = (pids.clone(), stop.clone());
            std::thread::Builder::new()
                .name("perf-procstat".into())
                .spawn(move || {
                    let mut peak = rss_kib(&pids);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(SAMPLE_EVERY);
                        peak = peak.max(rss_kib(&pids));
                    }
                    peak
                })?
        };
        Ok(Watch {
            pids,
            cpu_at_start,
            stop,
            sampler,
        })
    }

    pub fn stop(self) -> Usage {
        let cpu = cpu_ns(&self.pids).saturating_sub(self.cpu_at_start);
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.thread().unpark();
        let peak = self.sampler.join().unwrap_or(0);
        Usage {
            cpu_ns: cpu,
            peak_rss_kib: peak.max(rss_kib(&self.pids)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let before = cpu_ns(&[me]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ns(&[me]) > before);
        assert!(rss_kib(&[me]) > 0);
        assert_eq!(family(me)[0], me);
    }
}
