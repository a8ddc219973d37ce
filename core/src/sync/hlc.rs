//! Hybrid logical clocks (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014).
//!
//! A [`Timestamp`] is wall-clock milliseconds, a logical counter, and the fingerprint of the
//! node that made it: timestamps from different nodes never compare equal, so they order
//! every write in the room the same way on every replica. The wall clock is passed in
//! (`unix_ms`); the clock never reads it.
//!
//! Guarantees:
//! - every timestamp [`Hlc::now`] returns is greater than every timestamp it returned or
//!   [`Hlc::observe`]d before, whatever the wall clock does (it may stand still or step back);
//! - the physical part stays within `max_offset` of the largest wall-clock reading seen,
//!   because a remote timestamp further ahead than that is refused with
//!   [`HlcError::TooFarAhead`] and does not move the clock: one node with a bad clock cannot
//!   drag everyone forward;
//! - the counter is a `u32`; should it run out within one millisecond (over four billion
//!   events), the physical part moves on by one millisecond instead of wrapping.

use std::cmp::Ordering;
use std::fmt;

use crate::identity::Fingerprint;

/// A point in hybrid logical time. Ordered by `ms`, then `counter`, then `node`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timestamp {
    /// Physical part: Unix milliseconds (at most `max_offset` ahead of some node's clock).
    pub ms: u64,
    /// Logical part: orders events within one millisecond.
    pub counter: u32,
    /// The node that made it (breaks ties).
    pub node: Fingerprint,
}

impl Timestamp {
    /// The smallest timestamp.
    pub const ZERO: Timestamp = Timestamp { ms: 0, counter: 0, node: Fingerprint::from_bytes([0; 32]) };
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.counter, self.node.as_bytes()).cmp(&(other.ms, other.counter, other.node.as_bytes()))
    }
}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.ms, self.counter, self.node.short())
    }
}

/// A remote timestamp the clock refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HlcError {
    /// The timestamp is further ahead of the local wall clock than the maximum offset.
    #[error("timestamp {remote_ms} is {} ms ahead of the local clock {local_ms} (at most {max_offset_ms})", remote_ms - local_ms)]
    TooFarAhead {
        /// The remote timestamp's physical part.
        remote_ms: u64,
        /// The local wall clock.
        local_ms: u64,
        /// The configured maximum offset.
        max_offset_ms: u64,
    },
}

/// A hybrid logical clock for one node.
#[derive(Debug, Clone)]
pub struct Hlc {
    node: Fingerprint,
    ms: u64,
    counter: u32,
    max_offset_ms: u64,
}

impl Hlc {
    /// Creates a clock for `node` that refuses remote timestamps more than `max_offset_ms`
    /// ahead of the wall clock.
    pub fn new(node: Fingerprint, max_offset_ms: u64) -> Self {
        Hlc { node, ms: 0, counter: 0, max_offset_ms }
    }

    /// Returns the node this clock stamps for.
    pub fn node(&self) -> Fingerprint {
        self.node
    }

    /// Returns the last timestamp issued or observed (its `node` is this clock's).
    pub fn last(&self) -> Timestamp {
        Timestamp { ms: self.ms, counter: self.counter, node: self.node }
    }

    /// Returns a new timestamp for a local event, greater than any before.
    pub fn now(&mut self, unix_ms: u64) -> Timestamp {
        if unix_ms > self.ms {
            self.ms = unix_ms;
            self.counter = 0;
        } else {
            self.tick();
        }
        self.last()
    }

    /// Takes in a remote timestamp, so that later local timestamps are greater than it.
    /// One further ahead of `unix_ms` than the maximum offset is refused (the clock does not
    /// move).
    pub fn observe(&mut self, unix_ms: u64, remote: &Timestamp) -> Result<(), HlcError> {
        self.check(unix_ms, remote)?;
        let pt = unix_ms;
        let l = self.ms.max(remote.ms).max(pt);
        if l == self.ms && l == remote.ms {
            self.counter = self.counter.max(remote.counter);
            self.ms = l;
            self.tick();
        } else if l == self.ms {
            self.tick();
        } else if l == remote.ms {
            self.ms = l;
            self.counter = remote.counter;
            self.tick();
        } else {
            self.ms = l;
            self.counter = 0;
        }
        Ok(())
    }

    /// Checks a remote timestamp against the maximum offset without taking it in.
    pub fn check(&self, unix_ms: u64, remote: &Timestamp) -> Result<(), HlcError> {
        if remote.ms > unix_ms.saturating_add(self.max_offset_ms) {
            return Err(HlcError::TooFarAhead { remote_ms: remote.ms, local_ms: unix_ms, max_offset_ms: self.max_offset_ms });
        }
        Ok(())
    }

    fn tick(&mut self) {
        match self.counter.checked_add(1) {
            Some(c) => self.counter = c,
            None => {
                // Four billion events in one millisecond: borrow the next one.
                self.ms += 1;
                self.counter = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    #[test]
    fn stands_still_and_steps_back_without_going_back() {
        let mut c = Hlc::new(fp(1), 1000);
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(50);
        assert!(a < b && b < d);
        assert_eq!(d.ms, 100);
        assert_eq!(c.now(200), Timestamp { ms: 200, counter: 0, node: fp(1) });
    }

    #[test]
    fn far_future_timestamp_is_refused_and_leaves_the_clock() {
        let mut c = Hlc::new(fp(1), 1000);
        c.now(5000);
        let before = c.last();
        let remote = Timestamp { ms: 6001, counter: 0, node: fp(2) };
        assert_eq!(c.observe(5000, &remote), Err(HlcError::TooFarAhead { remote_ms: 6001, local_ms: 5000, max_offset_ms: 1000 }));
        assert_eq!(c.last(), before);
        // Exactly at the offset is fine, and later local stamps pass it.
        c.observe(5000, &Timestamp { ms: 6000, counter: 7, node: fp(2) }).unwrap();
        assert!(c.now(5000) > Timestamp { ms: 6000, counter: 7, node: fp(2) });
    }

    #[test]
    fn counter_overflow_moves_the_millisecond() {
        let mut c = Hlc::new(fp(1), 10);
        c.observe(100, &Timestamp { ms: 100, counter: u32::MAX, node: fp(2) }).unwrap();
        let t = c.last();
        assert_eq!((t.ms, t.counter), (101, 0));
        let u = c.now(100);
        assert!(u > t);
        let mut d = Hlc::new(fp(1), 10);
        d.ms = 7;
        d.counter = u32::MAX;
        assert_eq!(d.now(7), Timestamp { ms: 8, counter: 0, node: fp(1) });
    }

    #[derive(Debug, Clone)]
    enum Op {
        Local(u64),
        Remote(u64, u64, u32, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..10_000).prop_map(Op::Local),
            (0u64..10_000, 0u64..12_000, prop_oneof![0u32..4, Just(u32::MAX - 1), Just(u32::MAX)], 0u8..4).prop_map(|(p, r, c, n)| Op::Remote(p, r, c, n)),
        ]
    }

    proptest! {
        /// Local timestamps only grow, and each exceeds every remote timestamp taken in
        /// before it, whatever the wall clock does; refused ones leave the clock alone.
        #[test]
        fn monotonic_under_any_interleaving(ops in proptest::collection::vec(op(), 1..200)) {
            let mut c = Hlc::new(fp(9), 1000);
            let mut last_local: Option<Timestamp> = None;
            let mut max_seen = Timestamp::ZERO;
            for op in ops {
                match op {
                    Op::Local(pt) => {
                        let t = c.now(pt);
                        if let Some(prev) = last_local { prop_assert!(t > prev); }
                        prop_assert!(t > max_seen || max_seen == Timestamp::ZERO);
                        prop_assert!(t.ms >= pt);
                        last_local = Some(t);
                        max_seen = max_seen.max(t);
                    }
                    Op::Remote(pt, ms, counter, n) => {
                        let remote = Timestamp { ms, counter, node: fp(n) };
                        let before = c.last();
                        match c.observe(pt, &remote) {
                            Ok(()) => {
                                prop_assert!(ms <= pt + 1000);
                                prop_assert!((c.last().ms, c.last().counter) > (remote.ms, remote.counter));
                                prop_assert!(c.last() > before);
                                max_seen = max_seen.max(remote);
                            }
                            Err(HlcError::TooFarAhead { .. }) => {
                                prop_assert!(ms > pt + 1000);
                                prop_assert_eq!(c.last(), before);
                            }
                        }
                    }
                }
            }
        }
    }
}
