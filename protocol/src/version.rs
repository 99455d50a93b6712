//! Version vectors: which device made which change, so that replicas can tell
//! "newer" from "concurrent".

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// A device's short key in version vectors: the first 8 bytes of the blake3
/// hash of its device id. Short keys keep vectors small; 64 bits make a
/// collision among one user's or team's devices negligible.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct DeviceKey(pub u64);

impl DeviceKey {
    pub fn of_device_id(device_id: &str) -> DeviceKey {
        let hash = blake3::hash(device_id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        DeviceKey(u64::from_be_bytes(first))
    }
}

/// Counters per device, sorted by device. A sorted vector, not a map: an
/// index holds one per path, and most have one or two devices.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct VersionVector(Vec<(DeviceKey, u64)>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VersionOrder {
    Equal,
    /// `self` has seen everything `other` has, and more.
    Newer,
    Older,
    Concurrent,
}

impl VersionVector {
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    pub fn get(&self, device: DeviceKey) -> u64 {
        match self.0.binary_search_by_key(&device, |(d, _)| *d) {
            Ok(i) => self.0[i].1,
            Err(_) => 0,
        }
    }

    fn set(&mut self, device: DeviceKey, counter: u64) {
        match self.0.binary_search_by_key(&device, |(d, _)| *d) {
            Ok(i) => self.0[i].1 = counter,
            Err(i) => self.0.insert(i, (device, counter)),
        }
    }

    /// Records a new change by `device`: its counter moves past every counter
    /// in the vector, so the result dominates what it replaces.
    pub fn bump(&mut self, device: DeviceKey) {
        self.bump_at(device, 0);
    }

    /// [`bump`](Self::bump), with a counter of at least `floor`. Counters
    /// that only follow the vector start again from 1 when a device loses
    /// a workspace's index (it left a shared workspace and joined again):
    /// its new changes would look older than the ones it made before, and
    /// a peer's copy of those would silently replace them. The daemon
    /// passes one more than the highest counter the device ever issued.
    pub fn bump_at(&mut self, device: DeviceKey, floor: u64) {
        self.set(device, (self.top() + 1).max(floor));
    }

    /// The highest counter in the vector (0 if empty).
    pub fn top(&self) -> u64 {
        self.0.iter().map(|(_, c)| *c).max().unwrap_or(0)
    }

    pub fn merge(&mut self, other: &VersionVector) {
        for &(device, counter) in &other.0 {
            if counter > self.get(device) {
                self.set(device, counter);
            }
        }
    }

    pub fn compare(&self, other: &VersionVector) -> VersionOrder {
        let mut greater = false;
        let mut less = false;
        for (device, _) in self.0.iter().chain(other.0.iter()) {
            match self.get(*device).cmp(&other.get(*device)) {
                Ordering::Greater => greater = true,
                Ordering::Less => less = true,
                Ordering::Equal => {}
            }
        }
        match (greater, less) {
            (false, false) => VersionOrder::Equal,
            (true, false) => VersionOrder::Newer,
            (false, true) => VersionOrder::Older,
            (true, true) => VersionOrder::Concurrent,
        }
    }

    /// True for a vector a peer may send: sorted, no duplicates, a bounded
    /// number of devices, and counters far from overflow.
    pub fn is_well_formed(&self) -> bool {
        const DEVICES_MAX: usize = 4096;
        const COUNTER_MAX: u64 = 1 << 62;
        self.0.len() <= DEVICES_MAX
            && self.0.windows(2).all(|w| w[0].0 < w[1].0)
            && self.0.iter().all(|(_, c)| *c > 0 && *c <= COUNTER_MAX)
    }

    pub fn iter(&self) -> impl Iterator<Item = (DeviceKey, u64)> + '_ {
        self.0.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: DeviceKey = DeviceKey(1);
    const B: DeviceKey = DeviceKey(2);

    #[test]
    fn bump_orders_and_concurrency_is_detected() {
        let mut base = VersionVector::new();
        base.bump(A);
        let mut on_a = base.clone();
        on_a.bump(A);
        let mut on_b = base.clone();
        on_b.bump(B);
        assert_eq!(on_a.compare(&base), VersionOrder::Newer);
        assert_eq!(base.compare(&on_b), VersionOrder::Older);
        assert_eq!(on_a.compare(&on_b), VersionOrder::Concurrent);
        let mut merged = on_a.clone();
        merged.merge(&on_b);
        merged.bump(A);
        assert_eq!(merged.compare(&on_a), VersionOrder::Newer);
        assert_eq!(merged.compare(&on_b), VersionOrder::Newer);
    }

    #[test]
    fn a_device_that_lost_its_index_makes_concurrent_versions_not_older() {
        // A made three changes; B has the last. A's highest counter: 3.
        let mut on_b = VersionVector::new();
        for floor in 1..4 {
            on_b.bump_at(A, floor);
        }
        assert_eq!(on_b.get(A), 3);
        // A starts again from an empty index: its first counter is past
        // every one it issued.
        let mut again = VersionVector::new();
        again.bump_at(A, 4);
        assert_eq!(again.compare(&on_b), VersionOrder::Newer);
        // Where another device changed the file meanwhile: concurrent, a
        // conflict that keeps both, never "older".
        on_b.bump(B);
        assert_eq!(again.compare(&on_b), VersionOrder::Concurrent);
        // A floor below the vector: the counter still moves past it.
        on_b.bump_at(A, 1);
        assert_eq!(on_b.get(A), 5);
        assert_eq!(on_b.top(), 5);
    }

    proptest! {
        #[test]
        fn compare_is_antisymmetric(a in prop::collection::btree_map(0u64..4, 0u64..5, 0..4),
                                    b in prop::collection::btree_map(0u64..4, 0u64..5, 0..4)) {
            let va = VersionVector(a.into_iter().map(|(k, v)| (DeviceKey(k), v)).filter(|(_, v)| *v > 0).collect());
            let vb = VersionVector(b.into_iter().map(|(k, v)| (DeviceKey(k), v)).filter(|(_, v)| *v > 0).collect());
            prop_assert!(va.0.windows(2).all(|w| w[0].0 < w[1].0));
            let expected = match va.compare(&vb) {
                VersionOrder::Newer => VersionOrder::Older,
                VersionOrder::Older => VersionOrder::Newer,
                other => other,
            };
            prop_assert_eq!(vb.compare(&va), expected);
        }
    }
}
