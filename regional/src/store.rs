//! The region's PostgreSQL: pool, migrations, and the identity check that keeps
//! a node off another region's database.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::error::Error;

mod health;

pub(crate) use health::{Store, StoreHealth, Urls};

/// What a [`listen`] loop hands its caller.
pub(crate) enum Heard<'a> {
    /// A notification's payload.
    Payload(&'a str),
    /// The listening connection was (re)made: notifications sent while it
    /// was down are lost, so whatever waits on them should look again.
    Gap,
}

/// Listens on the NOTIFY `channel` until `shutdown`, reconnecting with
/// backoff (100 ms doubling to 5 s), and hands each notification, and each
/// gap a reconnect may have left, to `heard`. `what` names the listener in
/// its log lines.
pub(crate) async fn listen(
    pool: &PgPool,
    channel: &str,
    what: &str,
    shutdown: &CancellationToken,
    mut heard: impl FnMut(Heard<'_>),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(pool).await?;
            l.listen(channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = connect => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "cannot listen; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        backoff = Duration::from_millis(100);
        heard(Heard::Gap);
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                () = shutdown.cancelled() => return,
            };
            match next {
                Ok(Some(n)) => heard(Heard::Payload(n.payload())),
                // Lost and remade on this call: a gap.
                Ok(None) => heard(Heard::Gap),
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects (waiting up to `connect_timeout` for a server that is still
/// starting), migrates, and claims (or checks) the database for `region`.
/// Requests later wait at most `acquire_timeout` for a connection.
pub(crate) async fn connect(
    url: &str,
    region: &str,
    max_connections: u32,
    connect_timeout: Duration,
    acquire_timeout: Duration,
) -> Result<PgPool, Error> {
    let unreachable = |e: sqlx::Error| Error::PostgresUnreachable {
        url: redact(url),
        message: e.to_string(),
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy(url)
        .map_err(unreachable)?;
    let deadline = tokio::time::Instant::now() + connect_timeout;
    loop {
        match pool.acquire().await {
            Ok(_) => break,
            // Refused or timed out: the server may still be starting.
            Err(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(unreachable(e)),
        }
    }
    MIGRATOR.run(&pool).await?;
    let found: String = sqlx::query_scalar(
        "INSERT INTO region_identity (region) VALUES ($1)
         ON CONFLICT (singleton) DO UPDATE SET region = region_identity.region
         RETURNING region",
    )
    .bind(region)
    .fetch_one(&pool)
    .await?;
    if found != region {
        return Err(Error::WrongRegion {
            expected: region.to_string(),
            found,
        });
    }
    Ok(pool)
}

/// Drops the password from a URL before it goes into an error or a log.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("redis://h:1/"), "redis://h:1/");
    }
}
