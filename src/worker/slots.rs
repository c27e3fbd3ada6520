//! How a worker splits its free slots across partitions: in proportion to
//! the admissible weight each partition reported on its last claim.

use std::time::{Duration, Instant};

/// How a worker splits its free slots across partitions: in proportion to
/// the admissible weight each partition reported on its last claim, so a
/// tenant alone in a partition gets its weight's share of the fleet, not
/// the partition's. Fractions carry over from round to round (a worker
/// freeing one slot at a time still splits exactly over time). A partition
/// with no admissible weight is asked again (with a batch as if it were as
/// loaded as the busiest) when its wake channel speaks, when something in it
/// is due, or after `idle_poll`.
#[derive(Debug)]
pub(crate) struct SlotSplit {
    parts: Vec<PartShare>,
}

#[derive(Clone, Debug)]
pub(super) struct PartShare {
    /// Admissible weight on the worker's queues at the last claim.
    weight: f64,
    /// The fraction of a slot this partition is owed from earlier rounds.
    carry: f64,
    /// When its earliest delayed job or held tenant is due.
    due_at: Option<Instant>,
    /// When it was last claimed from.
    checked: Option<Instant>,
    /// Its wake channel spoke since.
    woken: bool,
}

impl SlotSplit {
    pub(crate) fn new(partitions: u32) -> SlotSplit {
        let unknown = PartShare {
            weight: 0.0,
            carry: 0.0,
            due_at: None,
            checked: None,
            woken: true,
        };
        SlotSplit {
            parts: vec![unknown; partitions as usize],
        }
    }

    pub(super) fn wake(&mut self, p: u32) {
        if let Some(s) = self.parts.get_mut(p as usize) {
            s.woken = true;
        }
    }

    pub(super) fn update(&mut self, p: u32, weight: f64, due_in: Option<Duration>, now: Instant) {
        if let Some(s) = self.parts.get_mut(p as usize) {
            s.weight = weight;
            s.due_at = due_in.map(|d| now + d);
            s.checked = Some(now);
            if weight <= 0.0 {
                s.carry = 0.0;
            }
        }
    }

    /// Time until the earliest due time of any partition.
    pub(super) fn next_due(&self, now: Instant) -> Option<Duration> {
        self.parts
            .iter()
            .filter_map(|s| s.due_at)
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    /// `(partition, batch)` for this round: every partition with weight,
    /// plus each weightless one that is due a look (its batch may be 0).
    pub(crate) fn plan(&mut self, free: usize, now: Instant, idle: Duration) -> Vec<(u32, usize)> {
        let busiest = self.parts.iter().map(|s| s.weight).fold(1.0, f64::max);
        let mut weights = Vec::new();
        for (p, s) in self.parts.iter_mut().enumerate() {
            let due = s.due_at.is_some_and(|d| d <= now);
            let stale = s.checked.is_none_or(|c| now.duration_since(c) >= idle);
            if s.weight > 0.0 {
                weights.push((p as u32, s.weight));
            } else if std::mem::take(&mut s.woken) || due || stale {
                weights.push((p as u32, busiest));
            }
        }
        self.allot(free, &weights)
    }

    /// Split `free` among `among` only, by their weights (leftovers).
    pub(super) fn plan_among(&mut self, among: &[u32], free: usize) -> Vec<(u32, usize)> {
        let weights: Vec<(u32, f64)> = among
            .iter()
            .filter_map(|&p| Some((p, self.parts.get(p as usize)?.weight)))
            .collect();
        self.allot(free, &weights)
    }

    /// Largest remainder with carried fractions: each partition gets
    /// `free * w / W` plus what it was owed, rounded down, and the slots
    /// left go to the largest fractions.
    fn allot(&mut self, free: usize, weights: &[(u32, f64)]) -> Vec<(u32, usize)> {
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut out: Vec<(u32, usize, f64)> = weights
            .iter()
            .map(|&(p, w)| {
                let owed = free as f64 * w / total + self.parts[p as usize].carry;
                let whole = owed.floor().max(0.0);
                (p, whole as usize, owed - whole)
            })
            .collect();
        let given: usize = out.iter().map(|(_, n, _)| n).sum();
        let mut rest = free.saturating_sub(given);
        out.sort_by(|a, b| b.2.total_cmp(&a.2));
        for o in out.iter_mut() {
            if rest == 0 {
                break;
            }
            o.1 += 1;
            o.2 -= 1.0;
            rest -= 1;
        }
        for &(p, _, carry) in &out {
            self.parts[p as usize].carry = carry.clamp(-1.0, 1.0);
        }
        out.into_iter().map(|(p, n, _)| (p, n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_by_weight_over_rounds() {
        let mut split = SlotSplit::new(4);
        let now = Instant::now();
        for (p, w) in [(0, 1.0), (1, 9.0), (2, 2.0), (3, 0.0)] {
            split.update(p, w, None, now);
        }
        let mut got = [0usize; 4];
        // One slot at a time, as a busy worker frees them.
        for _ in 0..1200 {
            for (p, n) in split.plan(1, now, Duration::from_secs(60)) {
                got[p as usize] += n;
            }
        }
        assert_eq!(got, [100, 900, 200, 0]);
        // A weightless partition is asked again once its wake channel speaks.
        split.wake(3);
        let plan = split.plan(12, now, Duration::from_secs(60));
        assert!(plan.iter().any(|&(p, _)| p == 3), "{plan:?}");
        assert_eq!(plan.iter().map(|(_, n)| n).sum::<usize>(), 12);
    }
}
