//! What a peer may send, checked before anything it sent is applied or
//! believed: a peer speaks for its own log only (or, in a relay, for the
//! origin it was asked about), acknowledges only what it was served, and
//! moves a job's ownership epoch by a bounded step. Every refusal is
//! counted (`meridian_replication_refused_total{peer,reason}`) and logged.

use meridian_proto::v1::Change;

use super::Replication;
use crate::error::Error;

/// How far ahead of the epoch here a replicated job row may carry its
/// ownership epoch. Each adoption adds one; a region away through this many
/// adoptions of one job is not a case to serve, and a wrapped or absurd
/// epoch would fence the job off everywhere for good.
pub(super) const MAX_EPOCH_STEP: i64 = 1_000;

/// Refusal reasons, the metric's `reason` label.
pub(super) mod reason {
    /// A Pull batch held a change of another origin than the peer.
    pub const FOREIGN_ORIGIN: &str = "foreign_origin";
    /// A relay held a row of another origin than the one asked for.
    pub const RELAY_ORIGIN: &str = "relay_origin";
    /// A relay carried log positions (only whole snapshots may).
    pub const RELAY_POSITIONS: &str = "relay_positions";
    /// An Ack above the log's high watermark.
    pub const ACK_AHEAD: &str = "ack_ahead";
    /// A job row whose ownership epoch jumps too far or out of range.
    pub const EPOCH_AHEAD: &str = "epoch_ahead";
}

impl Replication {
    /// Counts and logs a refusal of what `peer` sent; the error to fail with.
    pub(super) fn refuse(&self, peer: &str, reason: &'static str, message: String) -> Error {
        self.metrics
            .refused
            .with_label_values(&[peer, reason])
            .inc();
        tracing::warn!(peer, reason, %message, "refused what a replication peer sent");
        Error::Refused { reason, message }
    }

    /// Counts an error the apply path raised as a refusal, when it is one.
    pub(super) fn count_refusal(&self, peer: &str, e: &Error) {
        if let Error::Refused { reason, message } = e {
            self.metrics
                .refused
                .with_label_values(&[peer, reason])
                .inc();
            tracing::warn!(peer, reason, %message, "refused what a replication peer sent");
        }
    }
}

/// The first change not of `origin`, if any.
pub(super) fn foreign(changes: &[Change], origin: &str) -> Option<(u64, String)> {
    changes
        .iter()
        .find(|c| c.origin_region != origin)
        .map(|c| (c.sequence, c.origin_region.clone()))
}

/// Refuses a job row whose epoch is negative or more than
/// [`MAX_EPOCH_STEP`] past `here` (the row's epoch in this region, 0 when
/// it has none).
pub(super) fn check_epoch(key: &str, epoch: i64, here: i64) -> Result<(), Error> {
    if epoch < 0 || epoch > here.saturating_add(MAX_EPOCH_STEP) {
        return Err(Error::Refused {
            reason: reason::EPOCH_AHEAD,
            message: format!(
                "job {key} carries ownership epoch {epoch}, this region has {here} \
                 (at most {MAX_EPOCH_STEP} ahead)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_move_a_bounded_step_and_never_below_zero() {
        assert!(check_epoch("j", 1, 0).is_ok());
        assert!(check_epoch("j", MAX_EPOCH_STEP + 5, 5).is_ok());
        assert!(check_epoch("j", MAX_EPOCH_STEP + 1, 0).is_err());
        assert!(check_epoch("j", i64::MAX, i64::MAX - 1).is_ok());
        assert!(check_epoch("j", i64::MAX, 0).is_err());
        assert!(check_epoch("j", -1, 0).is_err());
    }

    #[test]
    fn a_change_of_another_origin_is_found() {
        let of = |o: &str, s| Change {
            origin_region: o.into(),
            sequence: s,
            ..Default::default()
        };
        assert_eq!(foreign(&[of("a", 1), of("a", 2)], "a"), None);
        assert_eq!(
            foreign(&[of("a", 1), of("b", 2)], "a"),
            Some((2, "b".into()))
        );
    }
}
