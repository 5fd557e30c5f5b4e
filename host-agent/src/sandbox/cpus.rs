//! Host CPUs for the process backend's execution environments.
//!
//! Lambda gives a function CPU in proportion to its memory: the equivalent of one vCPU at
//! 1,769 MB, up to six at 10,240 MB. A microVM gets its vCPUs from its configuration; a
//! process environment gets the same count of host CPUs through its CPU affinity, chosen
//! among the agent's own CPUs as the least used by other environments. Besides matching
//! the environment the function will have in a microVM (and on Lambda: a 128 MB function
//! sees one CPU's worth, so its runtime does not size thread pools for the whole host), a
//! runtime kept on one CPU does not bounce its threads' wake-ups between CPUs, which on a
//! busy host is a large part of the cost of a warm invocation.

use std::sync::{Arc, Mutex};

/// Memory that buys one vCPU on Lambda.
pub const MB_PER_VCPU: u32 = 1769;
/// Most vCPUs a Lambda function gets (at 10,240 MB).
pub const MAX_VCPUS: usize = 6;

/// Lambda's vCPU count for a function of `memory_mb`.
pub fn vcpus_for_memory(memory_mb: u32) -> usize {
    (memory_mb.div_ceil(MB_PER_VCPU) as usize).clamp(1, MAX_VCPUS)
}

/// The CPUs environments may be placed on, and how many environments use each.
#[derive(Debug)]
pub struct CpuPool {
    cpus: Vec<usize>,
    users: Mutex<Vec<u32>>,
}

impl CpuPool {
    /// The CPUs this process may run on (its affinity, which a cpuset or `taskset` may have
    /// narrowed).
    pub fn from_own_affinity() -> std::io::Result<Arc<CpuPool>> {
        // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`, which
        // we own.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let cpus = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads bit `c` of the set we own; c < CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect();
        Ok(Self::new(cpus))
    }

    pub fn new(cpus: Vec<usize>) -> Arc<CpuPool> {
        let users = Mutex::new(vec![0; cpus.len()]);
        Arc::new(CpuPool { cpus, users })
    }

    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    /// Places an environment that gets `n` CPUs: the `n` least used ones (all of them when
    /// `n` covers the pool). Released when the lease is dropped.
    pub fn lease(self: &Arc<Self>, n: usize) -> CpuLease {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut order: Vec<usize> = (0..self.cpus.len()).collect();
        // Stable: among equally used CPUs the lowest numbered first.
        order.sort_by_key(|&i| users[i]);
        order.truncate(n.max(1));
        order.sort_unstable();
        for &i in &order {
            users[i] += 1;
        }
        CpuLease {
            pool: self.clone(),
            slots: order,
        }
    }

    /// How many environments use each CPU (in pool order).
    pub fn users(&self) -> Vec<u32> {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The CPUs one environment runs on.
#[derive(Debug)]
pub struct CpuLease {
    pool: Arc<CpuPool>,
    /// Indices into the pool's CPU list.
    slots: Vec<usize>,
}

impl CpuLease {
    /// The host CPU numbers.
    pub fn cpus(&self) -> Vec<usize> {
        self.slots.iter().map(|&i| self.pool.cpus[i]).collect()
    }

    /// Makes the command's process (and so everything it starts) run on the lease's CPUs.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in self.cpus() {
            // SAFETY: CPU_SET writes bit `c` of the set we own; the pool's CPUs come from
            // sched_getaffinity, so c < CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: the closure runs in the forked child before exec and only calls
        // sched_setaffinity (a plain system call, async-signal-safe) on a set built before
        // the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for CpuLease {
    fn drop(&mut self) {
        let mut users = self.pool.users.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.slots {
            users[i] = users[i].saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_follow_lambda_memory_steps() {
        assert_eq!(vcpus_for_memory(128), 1);
        assert_eq!(vcpus_for_memory(1769), 1);
        assert_eq!(vcpus_for_memory(1770), 2);
        assert_eq!(vcpus_for_memory(3008), 2);
        assert_eq!(vcpus_for_memory(10240), 6);
        assert_eq!(vcpus_for_memory(u32::MAX), MAX_VCPUS);
    }

    #[test]
    fn leases_spread_over_the_least_used_cpus_and_are_given_back() {
        let pool = CpuPool::new(vec![0, 2, 4]);
        let a = pool.lease(1);
        let b = pool.lease(1);
        let c = pool.lease(1);
        assert_eq!((a.cpus(), b.cpus(), c.cpus()), (vec![0], vec![2], vec![4]));
        drop(b);
        assert_eq!(pool.users(), vec![1, 0, 1]);
        // The freed CPU is the least used one.
        let d = pool.lease(1);
        assert_eq!(d.cpus(), vec![2]);
        // Two CPUs: the two least used (all equal: the lowest).
        let e = pool.lease(2);
        assert_eq!(e.cpus(), vec![0, 2]);
        assert_eq!(pool.users(), vec![2, 2, 1]);
        // More than the pool has: all of it.
        let f = pool.lease(8);
        assert_eq!(f.cpus(), vec![0, 2, 4]);
        drop((a, c, d, e, f));
        assert_eq!(pool.users(), vec![0, 0, 0]);
    }

    #[tokio::test]
    async fn a_leased_command_runs_on_its_cpus_only() {
        let own = CpuPool::from_own_affinity().expect("own affinity");
        assert!(!own.is_empty());
        let lease = own.lease(1);
        let mut cmd = tokio::process::Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        lease.apply(&mut cmd);
        let out = cmd.output().await.expect("grep runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let cpu = lease.cpus()[0];
        assert_eq!(
            text.split_whitespace().last(),
            Some(cpu.to_string().as_str()),
            "{text}"
        );
    }
}
