//! How workers of one role share the work: database names are split into a
//! fixed number of partitions by a stable hash, and workers hold partitions
//! through lease documents in the spiegel database.
//!
//! Reading order: [`lease`] (the documents), [`liveness`] (who is alive),
//! [`taker`] (who should hold what), [`partition`] (the lease lifecycle),
//! [`renewer`] (heartbeat and fencing), [`store`] (where documents live),
//! [`coordinator`] (the task that ties them together). The ids of every
//! internal document are in [`crate::ids`].

pub(crate) mod coordinator;
mod lease;
mod liveness;
mod partition;
mod renewer;
pub(crate) mod store;
mod taker;

use serde::{Deserialize, Serialize};

pub use self::lease::DocIds;
pub(crate) use self::lease::{LeaseDoc, WorkerDoc};
pub use self::renewer::Timing;

/// The installation's fixed parameters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Settings {
    #[serde(rename = "type")]
    pub kind: String,
    /// Number of partitions of database names; fixed once installed.
    pub partitions: u32,
    /// The Spiegel version that installed.
    pub installed_by: String,
}

impl Settings {
    pub const KIND: &'static str = "spiegel_settings";

    pub fn new(partitions: u32) -> Self {
        Settings {
            kind: Self::KIND.to_string(),
            partitions,
            installed_by: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The partition of a database name: FNV-1a (64 bit) of the name's UTF-8
/// bytes, modulo the partition count. Stable across versions, platforms and
/// languages, which matters because every worker must agree on it.
pub(crate) fn partition_of(db_name: &str, partitions: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = db_name
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_known() {
        // FNV-1a test vectors: "" -> cbf29ce484222325, "a" -> af63dc4c8601ec8c.
        assert_eq!(
            partition_of("", 1 << 31),
            (0xcbf2_9ce4_8422_2325u64 % (1 << 31)) as u32
        );
        assert_eq!(
            partition_of("a", 1 << 31),
            (0xaf63_dc4c_8601_ec8cu64 % (1 << 31)) as u32
        );
        assert_eq!(partition_of("user/1", 32), partition_of("user/1", 32));
        assert!(partition_of("anything", 1) == 0);
    }

    #[test]
    fn partitions_spread_names_evenly() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("userdb-{i:x}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
