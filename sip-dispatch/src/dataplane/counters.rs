//! The fast path's counters, summed over CPUs.
use aya::maps::{MapData, PerCpuArray};
use sip_dispatch_common::{BackendStats, Counter, MAP_BACKEND_STATS, MAP_COUNTERS};

use super::Dataplane;

impl Dataplane {
    /// Fast-path counters summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_COUNTERS)?)?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = map.get(&(*c as u32), 0)?;
                Ok((*c, saturating_sum(per_cpu.iter().copied())))
            })
            .collect()
    }

    pub fn backend_stats(&self, id: u32) -> anyhow::Result<BackendStats> {
        let map: PerCpuArray<&MapData, BackendStats> =
            PerCpuArray::try_from(self.map(MAP_BACKEND_STATS)?)?;
        let per_cpu = map.get(&id, 0)?;
        Ok(sum_backend_stats(per_cpu.iter()))
    }
}

/// Per-CPU kernel counters summed without overflow: a counter at the top of its range
/// (a wrapped or hostile map) stays there instead of panicking the daemon.
fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

fn sum_backend_stats<'a>(per_cpu: impl Iterator<Item = &'a BackendStats>) -> BackendStats {
    per_cpu.fold(BackendStats::default(), |a, s| BackendStats {
        packets: a.packets.saturating_add(s.packets),
        bytes: a.bytes.saturating_add(s.bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_sums_saturate_instead_of_overflowing() {
        assert_eq!(saturating_sum([1, 2, 3].into_iter()), 6);
        assert_eq!(saturating_sum([u64::MAX, 1, 5].into_iter()), u64::MAX);
        let per_cpu = [
            BackendStats {
                packets: u64::MAX - 1,
                bytes: 10,
            },
            BackendStats {
                packets: 7,
                bytes: u64::MAX,
            },
        ];
        let sum = sum_backend_stats(per_cpu.iter());
        assert_eq!((sum.packets, sum.bytes), (u64::MAX, u64::MAX));
    }
}
