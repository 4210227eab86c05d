//! The region's PostgreSQL: pool, migrations, and the identity check that keeps
//! a node off another region's database.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::error::Error;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects, migrates, and claims (or checks) the database for `region`.
pub(crate) async fn connect(
    url: &str,
    region: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, Error> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect(url)
        .await
        .map_err(|e| Error::PostgresUnreachable {
            url: redact(url),
            message: e.to_string(),
        })?;
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
