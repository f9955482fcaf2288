//! Which I/O driver the workers run on, and how each worker's io_uring is set up.
//!
//! A worker's ring is created, submitted to and waited on by that worker's thread alone, which
//! is exactly the case the newer setup flags are for: completions are run when the worker asks
//! for them instead of interrupting it (`COOP_TASKRUN`, 5.19; `DEFER_TASKRUN`, 6.1), and the
//! kernel skips the locking a shared ring needs (`SINGLE_ISSUER`, 6.0). Each flag is probed once
//! at start by building a ring of the real size with it; a kernel that refuses one (5.10 refuses all of
//! them, seccomp may refuse io_uring altogether) starts without it, and the log says which.

use std::fmt;
use std::io;

/// The driver asked for in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring, as `auto` does today (with a warning where the kernel refuses it); kept
    /// apart so that `auto` may follow a future measurement without changing what `io_uring`
    /// asks for.
    IoUring,
    Epoll,
}

/// One io_uring setup flag Aura knows how to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFlag {
    CoopTaskrun,
    TaskrunFlag,
    SingleIssuer,
    DeferTaskrun,
}

impl RingFlag {
    /// Newest kernel first: the order in which flags are given up when a kernel refuses a set.
    const NEWEST_FIRST: [RingFlag; 4] = [
        RingFlag::DeferTaskrun,
        RingFlag::SingleIssuer,
        RingFlag::TaskrunFlag,
        RingFlag::CoopTaskrun,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RingFlag::CoopTaskrun => "coop_taskrun",
            RingFlag::TaskrunFlag => "taskrun_flag",
            RingFlag::SingleIssuer => "single_issuer",
            RingFlag::DeferTaskrun => "defer_taskrun",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The flag the kernel requires beside this one.
    fn needs(self) -> Option<RingFlag> {
        match self {
            RingFlag::TaskrunFlag => Some(RingFlag::CoopTaskrun),
            RingFlag::DeferTaskrun => Some(RingFlag::SingleIssuer),
            RingFlag::CoopTaskrun | RingFlag::SingleIssuer => None,
        }
    }
}

/// A set of [`RingFlag`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingFlags(u8);

impl RingFlags {
    pub const NONE: RingFlags = RingFlags(0);

    /// What `auto` asks for: the set measured best together (perf/RESULTS.md, "The ring"). With
    /// DEFER_TASKRUN, completions are taken only when a worker waits for them, which monoio does
    /// each time it runs out of tasks; TASKRUN_FLAG is inert (monoio does not read it) and kept
    /// because the measured set had it.
    pub const DEFAULT: RingFlags = RingFlags::NONE
        .with(RingFlag::CoopTaskrun)
        .with(RingFlag::TaskrunFlag)
        .with(RingFlag::SingleIssuer)
        .with(RingFlag::DeferTaskrun);

    pub const fn with(self, flag: RingFlag) -> RingFlags {
        RingFlags(self.0 | 1 << flag as u8)
    }

    pub fn has(self, flag: RingFlag) -> bool {
        self.0 & flag.bit() != 0
    }

    fn without(self, flag: RingFlag) -> RingFlags {
        RingFlags(self.0 & !flag.bit())
    }

    fn iter(self) -> impl Iterator<Item = RingFlag> {
        RingFlag::NEWEST_FIRST
            .into_iter()
            .rev()
            .filter(move |f| self.has(*f))
    }

    /// `auto`, `none`, or flag names separated by commas. A flag without the one it needs is an
    /// error, not a silent addition.
    pub fn parse(text: &str) -> Result<RingFlags, String> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "auto" | "default" => return Ok(RingFlags::DEFAULT),
            "none" | "" => return Ok(RingFlags::NONE),
            _ => {}
        }
        let mut flags = RingFlags::NONE;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let flag = RingFlag::NEWEST_FIRST
                .into_iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    format!(
                        "`{name}` is not an io_uring setup flag Aura uses (auto, none, or any of \
                         coop_taskrun, taskrun_flag, single_issuer, defer_taskrun)"
                    )
                })?;
            flags = flags.with(flag);
        }
        for flag in flags.iter() {
            if let Some(needed) = flag.needs().filter(|n| !flags.has(*n)) {
                return Err(format!(
                    "{} needs {} (the kernel refuses it alone)",
                    flag.name(),
                    needed.name()
                ));
            }
        }
        Ok(flags)
    }

    /// An io_uring builder with these flags set.
    pub fn builder(self) -> io_uring::Builder {
        let mut builder = io_uring::IoUring::builder();
        for flag in self.iter() {
            match flag {
                RingFlag::CoopTaskrun => builder.setup_coop_taskrun(),
                RingFlag::TaskrunFlag => builder.setup_taskrun_flag(),
                RingFlag::SingleIssuer => builder.setup_single_issuer(),
                RingFlag::DeferTaskrun => builder.setup_defer_taskrun(),
            };
        }
        builder
    }
}

impl fmt::Display for RingFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == RingFlags::NONE {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(RingFlag::name).collect();
        f.write_str(&names.join(","))
    }
}

/// The config's I/O settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSettings {
    pub driver: IoDriver,
    pub ring_flags: RingFlags,
    /// Submission queue entries of each worker's ring (monoio's default: 1024).
    pub ring_entries: u32,
}

impl Default for IoSettings {
    fn default() -> Self {
        IoSettings {
            driver: IoDriver::Auto,
            ring_flags: RingFlags::DEFAULT,
            ring_entries: 1024,
        }
    }
}

/// What the workers will run on, once probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPlan {
    /// io_uring with the flags this kernel took.
    Uring {
        flags: RingFlags,
        entries: u32,
    },
    Epoll,
}

impl IoPlan {
    /// io_uring as monoio sets it up by itself (no flags, 1024 entries): what the perf harness's
    /// own load generator and mock run on, whatever Aura is tried with.
    pub const PLAIN_URING: IoPlan = IoPlan::Uring {
        flags: RingFlags::NONE,
        entries: 1024,
    };
}

impl IoSettings {
    /// Probes the kernel with `try_ring` (a ring of these flags builds, or the kernel's error)
    /// and settles what the workers run on. A kernel that refuses a flag answers EINVAL: flags
    /// are given up newest first (each logged) until a ring builds. Any other refusal (EPERM
    /// from a seccomp profile, ENOMEM from RLIMIT_MEMLOCK) is not about a flag: the ring is
    /// tried once without any, and else the workers run on epoll.
    pub fn plan_with(&self, try_ring: impl Fn(RingFlags) -> io::Result<()>) -> IoPlan {
        if self.driver == IoDriver::Epoll {
            return IoPlan::Epoll;
        }
        let uring = |flags| IoPlan::Uring {
            flags,
            entries: self.ring_entries,
        };
        let mut flags = self.ring_flags;
        loop {
            let e = match try_ring(flags) {
                Ok(()) => return uring(flags),
                Err(e) => e,
            };
            let newest = RingFlag::NEWEST_FIRST.into_iter().find(|f| flags.has(*f));
            match newest {
                Some(newest) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        flag = newest.name(),
                        error = %e,
                        "io_uring setup flag refused by this kernel; running without it"
                    );
                    flags = flags.without(newest);
                    for dependent in RingFlag::NEWEST_FIRST {
                        if dependent.needs() == Some(newest) {
                            flags = flags.without(dependent);
                        }
                    }
                }
                Some(_) if try_ring(RingFlags::NONE).is_ok() => {
                    tracing::warn!(error = %e, setup = %flags, "io_uring refused these setup flags; running without any");
                    return uring(RingFlags::NONE);
                }
                _ => {
                    tracing::warn!(error = %e, "io_uring refused by this kernel; workers run on epoll");
                    return IoPlan::Epoll;
                }
            }
        }
    }

    /// [`plan_with`](Self::plan_with) against this kernel, once monoio's own detection passed:
    /// it checks that the kernel has every operation monoio uses (5.4 builds a ring but has no
    /// accept, 5.5 no send or recv), and honours `MONOIO_FORCE_LEGACY_DRIVER`.
    pub fn plan(&self) -> IoPlan {
        if self.driver != IoDriver::Epoll && !monoio::utils::detect_uring() {
            tracing::warn!(
                "io_uring is missing or lacks operations Aura uses; workers run on epoll"
            );
            return IoPlan::Epoll;
        }
        let entries = self.ring_entries;
        self.plan_with(|flags| flags.builder().build(entries).map(drop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_by_name_and_refuse_a_flag_without_the_one_it_needs() {
        assert_eq!(RingFlags::parse("auto"), Ok(RingFlags::DEFAULT));
        assert_eq!(RingFlags::parse(" None "), Ok(RingFlags::NONE));
        let coop = RingFlags::parse("coop_taskrun").expect("one flag");
        assert!(coop.has(RingFlag::CoopTaskrun) && !coop.has(RingFlag::SingleIssuer));
        assert_eq!(coop.to_string(), "coop_taskrun");
        let both = RingFlags::parse("single_issuer, defer_taskrun").expect("a pair");
        assert_eq!(both.to_string(), "single_issuer,defer_taskrun");
        let err = RingFlags::parse("defer_taskrun").expect_err("needs single_issuer");
        assert!(err.contains("needs single_issuer"), "{err}");
        let err = RingFlags::parse("sqpoll").expect_err("unknown");
        assert!(err.contains("`sqpoll`"), "{err}");
    }

    #[test]
    fn a_kernel_refusing_new_flags_gets_the_ones_it_takes_and_one_refusing_all_gets_epoll() {
        let settings = IoSettings::default();
        // A 5.19 kernel: the coop flags but neither single_issuer nor defer_taskrun.
        let five_nineteen = |f: RingFlags| {
            if f.has(RingFlag::SingleIssuer) || f.has(RingFlag::DeferTaskrun) {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(())
            }
        };
        let plan = settings.plan_with(five_nineteen);
        let expected = RingFlags::NONE
            .with(RingFlag::CoopTaskrun)
            .with(RingFlag::TaskrunFlag);
        assert_eq!(
            plan,
            IoPlan::Uring {
                flags: expected,
                entries: 1024
            }
        );
        // 5.10 takes none of the flags but io_uring itself.
        let five_ten = |f: RingFlags| {
            if f == RingFlags::NONE {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        };
        assert_eq!(
            settings.plan_with(five_ten),
            IoPlan::Uring {
                flags: RingFlags::NONE,
                entries: 1024
            }
        );
        // A seccomp profile refusing io_uring_setup.
        let refused = |_: RingFlags| Err(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(settings.plan_with(refused), IoPlan::Epoll);
        // A refusal that is not about a flag (here ENOMEM for a ring with flags) drops them all
        // at once, without blaming each.
        let memlock = |f: RingFlags| {
            if f == RingFlags::NONE {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            }
        };
        assert_eq!(
            settings.plan_with(memlock),
            IoPlan::Uring {
                flags: RingFlags::NONE,
                entries: 1024
            }
        );
        // Asked for epoll, nothing is probed.
        let epoll = IoSettings {
            driver: IoDriver::Epoll,
            ..settings
        };
        assert_eq!(
            epoll.plan_with(|_| panic!("probed although epoll was asked for")),
            IoPlan::Epoll
        );
    }

    #[test]
    fn this_kernel_builds_a_ring_with_every_flag_it_was_not_refused() {
        // Whatever the kernel, the plan's flags build a ring: the probe's answer is usable.
        if let IoPlan::Uring { flags, entries } = IoSettings::default().plan() {
            assert!(flags.builder().build(entries).is_ok(), "{flags}");
        }
    }
}
