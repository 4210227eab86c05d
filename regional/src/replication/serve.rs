//! `meridian.v1.Replication`: peers pull this region's log and acknowledge
//! what they applied. The mesh policy lets only region identities call it;
//! here a caller may also only speak for its own region.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use meridian_mesh::Role;
use meridian_proto::v1::replication_server::{Replication as ReplicationApi, ReplicationServer};
use meridian_proto::v1::{
    AckRequest, AckResponse, ChangeBatch, PullRequest, SnapshotChunk, SnapshotRequest,
};
use tonic::{Request, Response, Status};

use super::{Replication, log, snapshot, trust};
use crate::error::Error;
use crate::mesh::Peer;

pub(crate) fn service(replication: Arc<Replication>) -> ReplicationServer<Service> {
    // The encoder's limit is the followers' decoder limit: a batch the
    // server builds is one the peer accepts.
    ReplicationServer::new(Service { replication })
        .max_encoding_message_size(super::MAX_MESSAGE_BYTES)
}

pub(crate) struct Service {
    replication: Arc<Replication>,
}

/// Refuses a caller whose certificate names another region than the one it
/// speaks for (in plaintext mode there are no identities to check).
fn check_caller<T>(request: &Request<T>, peer_region: &str) -> Result<(), Status> {
    if peer_region.is_empty() {
        return Err(Error::invalid("`peer_region` is required", None).into());
    }
    // Stored and used as a label: only a name a region can have.
    if !crate::config::valid_region_name(peer_region) {
        return Err(Error::invalid(
            "`peer_region` must be 1 to 63 lowercase letters, digits and dashes",
            None,
        )
        .into());
    }
    match request.extensions().get::<Peer>() {
        Some(Peer(identity))
            if identity.role() != Role::Region || identity.name() != peer_region =>
        {
            Err(Status::permission_denied(format!(
                "{identity} may not speak for region {peer_region:?}"
            )))
        }
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl ReplicationApi for Service {
    type PullStream = BoxStream<'static, Result<ChangeBatch, Status>>;
    type SnapshotStream = BoxStream<'static, Result<SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        check_caller(&request, &request.get_ref().peer_region)?;
        let req = request.into_inner();
        let r = &self.replication;
        let limit = match req.max_chunk {
            0 => r.config.batch_size,
            n => n.min(r.config.batch_size),
        };
        let scope = snapshot::Scope::of(&req);
        match &scope {
            snapshot::Scope::Whole => {
                tracing::info!(peer = %req.peer_region, "replication snapshot requested");
            }
            snapshot::Scope::Relay { origin, .. } => {
                tracing::info!(peer = %req.peer_region, origin = %origin, "replication relay requested");
            }
        }
        let chunks = snapshot::serve(
            r.pool.clone(),
            snapshot::Budget {
                rows: limit,
                bytes: r.config.max_batch_bytes,
            },
            scope,
            req.peer_region.clone(),
        );
        // A taker that stops reading would hold the snapshot's transaction
        // (and the vacuum horizon) open.
        let timeout = Duration::from_millis(r.config.snapshot_write_timeout_ms);
        let cut = Status::deadline_exceeded(format!(
            "the snapshot was cut: its taker read nothing for {} ms \
             (`replication.snapshot_write_timeout_ms`)",
            timeout.as_millis()
        ));
        let chunks =
            crate::slow_reader::cut_after(chunks, timeout, "replication snapshot", Some(Err(cut)));
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        check_caller(&request, &request.get_ref().peer_region)?;
        let req = request.into_inner();
        let r = self.replication.clone();
        let limit = match req.max_batch {
            0 => r.config.batch_size,
            n => n.min(r.config.batch_size),
        };
        let max_bytes = r.config.max_batch_bytes;
        // Subscribed before the first read, so no commit falls between.
        let mut commits = r.commits.subscribe();
        // Readings go to the peers named for them only; the others are moved
        // past them by `through_sequence`.
        let audience = log::Audience {
            peer: req.peer_region.clone(),
            with_readings: r.config.sends_readings_to(&req.peer_region),
        };
        // The first read answers the call itself, so a truncated log fails
        // the RPC with its status rather than a stream that ends at once.
        let first = log::read(&r.pool, req.from_sequence, limit, max_bytes, &audience).await?;
        let incarnation = snapshot::incarnation(&r.pool).await?;
        tracing::info!(peer = %req.peer_region, from = req.from_sequence, with_readings = audience.with_readings, "replication pull started");
        let heartbeat = Duration::from_millis(r.config.heartbeat_interval_ms);
        let stream = async_stream::try_stream! {
            let mut read = first;
            loop {
                let log::Read { changes, through, high, clock, full } = read;
                // An empty batch is the heartbeat: it carries the watermark,
                // and the position past changes left out for this caller.
                yield ChangeBatch {
                    changes,
                    high_watermark: high,
                    log_incarnation: incarnation.clone(),
                    through_sequence: through,
                    clock,
                    // Current as the batch leaves, heartbeats included: the
                    // peer's adoptions wait for this view to agree.
                    lost_regions: r.liveness.lost(),
                };
                if !full {
                    tokio::select! {
                        _ = commits.changed() => {}
                        () = tokio::time::sleep(heartbeat) => {}
                        () = r.shutdown.cancelled() => break,
                    }
                }
                if r.shutdown.is_cancelled() {
                    break;
                }
                commits.borrow_and_update();
                read = log::read(&r.pool, through, limit, max_bytes, &audience).await?;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        check_caller(&request, &request.get_ref().peer_region)?;
        let req = request.into_inner();
        let r = &self.replication;
        let (_, high) = log::bounds(&r.pool).await?;
        // A peer acknowledges what it was served, which is at most the log's
        // end: an ack past it is forged, or counts in another incarnation of
        // this log (a database restored from an older backup), and taking it
        // would confirm synchronous writes the peer never received.
        if req.applied_sequence > high {
            let e = r.refuse(
                &req.peer_region,
                trust::reason::ACK_AHEAD,
                format!(
                    "ack of sequence {} past the log's end {high}",
                    req.applied_sequence
                ),
            );
            return Err(Status::failed_precondition(e.to_string()));
        }
        // Before the write to PostgreSQL: the peer's apply transaction has
        // committed, which is all a synchronous writer waits for; the row
        // only bounds trimming.
        r.note_ack(&req.peer_region, req.applied_sequence);
        log::ack(&r.pool, &req.peer_region, req.applied_sequence).await?;
        Ok(Response::new(AckResponse {
            high_watermark: high,
        }))
    }
}
