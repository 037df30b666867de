//! Which partitions a worker should take or give up: the balance every
//! worker computes on its own view of members and leases.

use std::collections::BTreeSet;

/// What a worker should do with its leases.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub claim: Vec<u32>,
    pub release: Vec<u32>,
}

/// Balances partitions among live workers: the first `P mod n` workers by id
/// hold `P/n + 1` partitions, the others `P/n`. A worker over its share
/// releases its highest partitions; a worker under it claims free partitions
/// (no owner, or an owner that is not live), starting at an offset given by
/// its rank so that several newcomers do not all race for the same ones.
/// Every worker runs this on its own view; views converge within a heartbeat.
pub fn plan(me: &str, live: &BTreeSet<String>, owners: &[(u32, Option<String>)]) -> Plan {
    let partitions = owners.len();
    let mut workers: Vec<&str> = live.iter().map(String::as_str).collect();
    if !live.contains(me) {
        workers.push(me);
        workers.sort_unstable();
    }
    let n = workers.len();
    let rank = workers.iter().position(|w| *w == me).unwrap_or(0);
    let target = partitions / n + usize::from(rank < partitions % n);

    let mut mine: Vec<u32> = owners
        .iter()
        .filter(|(_, owner)| owner.as_deref() == Some(me))
        .map(|(p, _)| *p)
        .collect();
    mine.sort_unstable();
    if mine.len() > target {
        return Plan {
            claim: Vec::new(),
            release: mine.split_off(target),
        };
    }
    let free: Vec<u32> = owners
        .iter()
        .filter(|(_, owner)| match owner {
            None => true,
            Some(o) => o != me && !live.contains(o),
        })
        .map(|(p, _)| *p)
        .collect();
    let want = target - mine.len();
    if want == 0 || free.is_empty() {
        return Plan::default();
    }
    let offset = (rank * free.len()) / n;
    let claim = free
        .iter()
        .cycle()
        .skip(offset)
        .take(want.min(free.len()))
        .copied()
        .collect();
    Plan {
        claim,
        release: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn owners(list: &[Option<&str>]) -> Vec<(u32, Option<String>)> {
        list.iter()
            .enumerate()
            .map(|(p, o)| (p as u32, o.map(String::from)))
            .collect()
    }

    /// Runs every worker's plan on a shared table until nothing changes.
    fn converge(workers: &[&str], table: &mut Vec<(u32, Option<String>)>) -> usize {
        let alive = live(workers);
        for round in 1..20 {
            let mut changed = false;
            for w in workers {
                let plan = plan(w, &alive, table);
                for p in plan.release {
                    table[p as usize].1 = None;
                    changed = true;
                }
                for p in plan.claim {
                    let owner = &mut table[p as usize].1;
                    let free = owner.as_deref().is_none_or(|o| !alive.contains(o));
                    if free {
                        *owner = Some(w.to_string());
                        changed = true;
                    }
                }
            }
            if !changed {
                return round;
            }
        }
        panic!("no convergence: {table:?}");
    }

    fn counts(workers: &[&str], table: &[(u32, Option<String>)]) -> Vec<usize> {
        workers
            .iter()
            .map(|w| {
                table
                    .iter()
                    .filter(|(_, o)| o.as_deref() == Some(*w))
                    .count()
            })
            .collect()
    }

    #[test]
    fn workers_split_partitions_within_one() {
        let mut table = owners(&[None; 32]);
        converge(&["a", "b", "c"], &mut table);
        assert_eq!(counts(&["a", "b", "c"], &table), [11, 11, 10]);
        assert!(table.iter().all(|(_, o)| o.is_some()));

        // A fourth joins: the others release, it claims.
        converge(&["a", "b", "c", "d"], &mut table);
        assert_eq!(counts(&["a", "b", "c", "d"], &table), [8, 8, 8, 8]);

        // "b" dies: its partitions are free to the live ones.
        converge(&["a", "c", "d"], &mut table);
        assert_eq!(counts(&["a", "c", "d"], &table), [11, 11, 10]);
    }

    #[test]
    fn a_lone_worker_takes_everything_and_more_workers_than_partitions_is_fine() {
        let mut table = owners(&[None; 4]);
        converge(&["x"], &mut table);
        assert_eq!(counts(&["x"], &table), [4]);
        converge(&["v", "w", "x", "y", "z"], &mut table);
        let c = counts(&["v", "w", "x", "y", "z"], &table);
        assert_eq!(c.iter().sum::<usize>(), 4);
        assert!(c.iter().all(|&n| n <= 1));
    }

    #[test]
    fn a_live_owner_keeps_its_lease() {
        let table = owners(&[Some("a"), Some("b")]);
        let p = plan("b", &live(&["a", "b"]), &table);
        assert_eq!(p, Plan::default());
        // "a" is not live any more: "b" takes its partition.
        let p = plan("b", &live(&["b"]), &table);
        assert_eq!(p.claim, vec![0]);
    }
}
