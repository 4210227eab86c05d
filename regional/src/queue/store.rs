//! The job record in PostgreSQL. Every state change is one conditional
//! UPDATE, so concurrent workers, duplicate deliveries and cancels race
//! safely: whoever's condition still holds wins, the others change nothing.
//!
//! [`record`] is the row and its types; the queries are grouped by who runs
//! them: the API ([`submit`]), a worker's attempt ([`attempt`]), the
//! sweeper ([`sweep`]) and the adopter of a lost peer's jobs ([`adoption`]).

/// Milliseconds from `$from` to now, never negative.
macro_rules! ms_since {
    ($from:literal) => {
        concat!(
            "greatest(0, (extract(epoch FROM now() - ",
            $from,
            ") * 1000)::bigint)"
        )
    };
}

/// Takes the region's replication clock before the row a replicated job
/// write changes, the order every replicated write and every apply keeps
/// (`0009_job_failover.sql` says why jobs take it here rather than in a
/// statement trigger). Uncorrelated, so PostgreSQL evaluates it once, before
/// it scans `jobs`.
macro_rules! clock_first {
    () => {
        "(SELECT true FROM region_identity FOR UPDATE)"
    };
}

mod adoption;
mod attempt;
mod record;
mod submit;
mod sweep;

pub(super) use self::adoption::{adopt, unfinished_of};
pub(super) use self::attempt::{Claim, Lease, claim, fail, renew, retry, succeed};
pub(crate) use self::record::{Job, JobError, JobRequest, JobResult, JobState, Priority};
pub(super) use self::submit::{by_key, by_key_any_home, cancel, depth, get, insert};
pub(super) use self::sweep::{queued_per_lane, runnable};
