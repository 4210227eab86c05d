//! Hybrid logical clock values as the protocol encodes them: Unix
//! milliseconds in the high 48 bits, a logical counter in the low 16.
//!
//! `uhlc` keeps NTP64 timestamps plus a node id, which does not fit the
//! proto's one `uint64`; the arithmetic is small enough to own. The clock's
//! state lives in PostgreSQL (`region_identity.hlc`), because writers other
//! than the node (the `meridian keys` CLI) tick it too: `tick` and `observe`
//! below are the rules the SQL in `0005_replication.sql` and
//! [`super::apply`] follow, kept here with their tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One clock value. Ordered as the `u64` it is: by milliseconds, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

/// Bits of the logical counter.
const LOGICAL_BITS: u32 = 16;

/// A remote clock too far ahead of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "clock {remote_ms} ms is {ahead_ms} ms ahead of this region's, more than the {max_ms} ms allowed"
)]
pub struct ClockDrift {
    /// The remote clock's milliseconds.
    pub remote_ms: u64,
    /// How far ahead of our wall clock it is.
    pub ahead_ms: u64,
    /// The configured maximum.
    pub max_ms: u64,
}

impl Hlc {
    /// The value `ms << 16 | logical`.
    pub const fn new(ms: u64, logical: u16) -> Self {
        Self((ms << LOGICAL_BITS) | logical as u64)
    }

    /// The value as the protocol carries it.
    pub const fn from_u64(v: u64) -> Self {
        Self(v)
    }

    /// The wire and database form.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Unix milliseconds.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The counter that orders events within one millisecond.
    pub const fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The clock after a local event at wall time `now_ms`: the wall clock
    /// when it moved past us, else one more than the last value (a counter
    /// that overflows carries into the milliseconds, running slightly ahead
    /// rather than repeating a value).
    pub fn tick(self, now_ms: u64) -> Self {
        Self((self.0 + 1).max(Self::new(now_ms, 0).0))
    }

    /// The clock after receiving `remote` at wall time `now_ms`: above both
    /// the last value and the remote one, unless the remote clock is more
    /// than `max_drift` ahead of the wall clock.
    pub fn observe(
        self,
        remote: Hlc,
        now_ms: u64,
        max_drift: Duration,
    ) -> Result<Self, ClockDrift> {
        check_drift(remote, now_ms, max_drift)?;
        Ok(Self(self.tick(now_ms).0.max(remote.0 + 1)))
    }
}

/// Refuses `remote` when it is more than `max_drift` ahead of `now_ms`.
pub fn check_drift(remote: Hlc, now_ms: u64, max_drift: Duration) -> Result<(), ClockDrift> {
    let max_ms = u64::try_from(max_drift.as_millis()).unwrap_or(u64::MAX);
    let ahead_ms = remote.physical_ms().saturating_sub(now_ms);
    if ahead_ms > max_ms {
        return Err(ClockDrift {
            remote_ms: remote.physical_ms(),
            ahead_ms,
            max_ms,
        });
    }
    Ok(())
}

/// The wall clock in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIFT: Duration = Duration::from_secs(5);

    #[test]
    fn encoding_matches_the_proto() {
        let h = Hlc::new(1_700_000_000_123, 7);
        assert_eq!(h.as_u64(), (1_700_000_000_123 << 16) | 7);
        assert_eq!(h.physical_ms(), 1_700_000_000_123);
        assert_eq!(h.logical(), 7);
        assert!(Hlc::new(10, 65535) < Hlc::new(11, 0));
        assert_eq!(h.to_string(), "1700000000123.7");
    }

    #[test]
    fn tick_follows_the_wall_clock_and_never_repeats() {
        let h = Hlc::new(100, 3);
        assert_eq!(h.tick(200), Hlc::new(200, 0));
        // Wall clock behind (or stalled): the counter moves instead.
        assert_eq!(h.tick(100), Hlc::new(100, 4));
        assert_eq!(h.tick(50), Hlc::new(100, 4));
        // Counter overflow carries into the milliseconds.
        assert_eq!(Hlc::new(100, u16::MAX).tick(100), Hlc::new(101, 0));
        let mut last = Hlc::default();
        for now in [5, 5, 5, 4, 9, 9, 1] {
            let next = last.tick(now);
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn observe_moves_past_the_remote_clock() {
        let ours = Hlc::new(1_000, 0);
        let remote = Hlc::new(3_000, 9);
        let after = ours.observe(remote, 2_000, DRIFT).unwrap();
        assert!(after > remote && after > ours);
        assert_eq!(after, Hlc::new(3_000, 10));
        // A local write after it orders after the remote one too.
        assert!(after.tick(2_001) > remote);
    }

    #[test]
    fn remote_clocks_too_far_ahead_are_refused() {
        let now = 1_000_000;
        assert!(check_drift(Hlc::new(now + 5_000, 0), now, DRIFT).is_ok());
        let e = check_drift(Hlc::new(now + 5_001, 0), now, DRIFT).unwrap_err();
        assert_eq!((e.ahead_ms, e.max_ms), (5_001, 5_000));
        assert!(
            Hlc::new(0, 0)
                .observe(Hlc::new(now + 60_000, 0), now, DRIFT)
                .is_err()
        );
        // Clocks behind ours are always fine: they only lose conflicts.
        assert!(check_drift(Hlc::new(1, 0), now, DRIFT).is_ok());
    }
}
