//! pgvector in a region's own database, where retrieval keeps its vectors:
//! the extension is created beside Meridian's tables, and an HNSW index
//! answers nearest-neighbour queries by cosine distance.

use meridian_tests::{RegionSandbox, require_extension};
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgvector_is_created_in_a_region_database_and_serves_hnsw_queries() {
    require_extension("vector", Some("vector"));
    super::setup();
    let region = RegionSandbox::start("eu-west").await;
    let pool = PgPool::connect(&region.postgres.url()).await.unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS vector")
        .execute(&pool)
        .await
        .unwrap();
    let version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!("pgvector {version}");

    sqlx::raw_sql(
        "CREATE TABLE passages (id int PRIMARY KEY, embedding vector(3) NOT NULL);
         CREATE INDEX passages_hnsw ON passages USING hnsw (embedding vector_cosine_ops);
         INSERT INTO passages VALUES
           (1, '[1, 0, 0]'), (2, '[0.9, 0.1, 0]'), (3, '[0, 1, 0]'),
           (4, '[0, 0, 1]'), (5, '[0.5, 0.5, 0.1]');",
    )
    .execute(&pool)
    .await
    .unwrap();

    // One connection, so the planner setting holds for both statements.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let nearest = "SELECT id FROM passages ORDER BY embedding <=> '[0.95, 0.1, 0]' LIMIT 3";
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {nearest}")))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        plan.iter().any(|line| line.contains("passages_hnsw")),
        "{plan:#?}"
    );
    let ids: Vec<i32> = sqlx::query_scalar(nearest)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(ids, vec![2, 1, 5]);

    // Half-precision vectors, which retrieval uses to halve index size.
    let distance: f64 =
        sqlx::query_scalar("SELECT '[1, 0, 0]'::halfvec(3) <=> '[0, 1, 0]'::halfvec(3)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert!((distance - 1.0).abs() < 1e-6, "{distance}");
}
