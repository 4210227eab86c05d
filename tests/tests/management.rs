//! The management API for tenants and keys (`/admin/v1/...`), against three
//! replicated regions and a gateway that reads keys from eu-west's
//! database: a tenant and key made through the API in us-east authenticate
//! through the gateway within 2 s, a key revoked through the API in
//! ap-south stops within 2 s, lists paginate, bad requests are named, and
//! every write is in the audit log of every region, with no secret in it.

use std::time::{Duration, Instant};

use meridian_gateway::AuthConfig;
use meridian_proto::v1::SnapshotRequest;
use meridian_proto::v1::replication_client::ReplicationClient;
use meridian_tests::replicated::until;
use meridian_tests::{ClusterSandbox, TEST_MODEL, init_logging};
use serde_json::{Value, json};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const PROMPT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(10);

struct Api {
    http: reqwest::Client,
    urls: Vec<String>,
}

impl Api {
    async fn send(
        &self,
        region: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/admin/v1/{path}", self.urls[region]));
        if let Some(body) = body {
            req = req.json(&body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        (status, headers, res.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, region: usize, path: &str) -> (u16, Value) {
        let (status, _, body) = self
            .send(region, reqwest::Method::GET, path, None, &[])
            .await;
        (status, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_keys_made_through_the_api_work_everywhere_and_are_audited() {
    init_logging();
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |regions, config| {
        config.auth = Some(AuthConfig {
            reload_interval_ms: 100,
            ..AuthConfig::new(regions[1].postgres.url())
        });
    })
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let chat = |key: String| {
        let (http, url) = (api.http.clone(), cluster.gateway_url());
        async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({ "model": TEST_MODEL, "max_tokens": 4,
                    "messages": [{ "role": "user", "content": "hello" }] }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // A tenant, created then updated in us-east: PUT replaces its limits.
    let (status, _, tenant) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/acme",
            Some(json!({ "display_name": "Acme", "requests_per_second": 50 })),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{tenant}");
    assert_eq!(tenant["requests_per_second"], 50);
    let (status, _, tenant) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/acme",
            Some(json!({ "tokens_per_minute": 100000 })),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(
        (
            &tenant["display_name"],
            &tenant["requests_per_second"],
            &tenant["tokens_per_minute"]
        ),
        (&json!("Acme"), &Value::Null, &json!(100000))
    );

    // A key, acknowledged once another region has it; it authenticates
    // through the gateway, which reads eu-west's database, within 2 s.
    let (status, headers, made) = api
        .send(
            0,
            reqwest::Method::POST,
            "tenants/acme/keys",
            None,
            &[("x-meridian-durability", "sync")],
        )
        .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(headers["x-meridian-durability"], "sync");
    let key = made["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("mk-") && key.starts_with(made["prefix"].as_str().unwrap()));
    let made_at = Instant::now();
    until(
        PROMPT,
        "the new key authenticating through the gateway",
        || {
            let chat = chat(key.clone());
            async move { chat.await == 200 }
        },
    )
    .await;
    eprintln!("key usable after {:?}", made_at.elapsed());

    // Listed anywhere, never in clear.
    let key_id = made["id"].as_str().unwrap().to_string();
    let (status, keys) = api.get(1, "tenants/acme/keys").await;
    assert_eq!(status, 200, "{keys}");
    assert_eq!(keys["data"][0]["id"], key_id.as_str());
    assert!(keys["data"][0].get("key").is_none(), "{keys}");
    assert!(!keys.to_string().contains(&key));
    let (_, tenant) = api.get(1, "tenants/acme").await;
    assert_eq!(tenant["live_keys"], 1, "{tenant}");

    // Revoked in ap-south: it stops at the gateway within 2 s.
    let (status, _, revoked) = api
        .send(
            2,
            reqwest::Method::DELETE,
            &format!("keys/{key_id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    until(PROMPT, "the revoked key refused by the gateway", || {
        let chat = chat(key.clone());
        async move { chat.await == 401 }
    })
    .await;

    // Pages of tenants, in id order.
    for i in 1..=4 {
        let (status, _, _) = api
            .send(
                0,
                reqwest::Method::PUT,
                &format!("tenants/page-{i}"),
                Some(json!({})),
                &[],
            )
            .await;
        assert_eq!(status, 201);
    }
    let (_, first) = api.get(0, "tenants?limit=2").await;
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&first), ["acme", "page-1"]);
    assert_eq!(first["has_more"], true);
    let (_, rest) = api
        .get(
            0,
            &format!(
                "tenants?limit=10&after={}",
                first["last_id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(ids(&rest), ["page-2", "page-3", "page-4"]);
    assert_eq!(rest["has_more"], false);

    // Bad requests are named and change nothing.
    for (method, path, body, status, named) in [
        (
            reqwest::Method::PUT,
            "tenants/bad%20id",
            Some(json!({})),
            400,
            "invalid tenant id",
        ),
        (
            reqwest::Method::PUT,
            "tenants/acme",
            Some(json!({"rps": 1})),
            400,
            "unknown field `rps`",
        ),
        (
            reqwest::Method::PUT,
            "tenants/acme",
            Some(json!({"requests_per_second": 0})),
            400,
            "at least 1",
        ),
        (
            reqwest::Method::POST,
            "tenants/nobody/keys",
            None,
            404,
            "no tenant \"nobody\"",
        ),
        (
            reqwest::Method::DELETE,
            "keys/not-a-uuid",
            None,
            400,
            "not a key id",
        ),
        (
            reqwest::Method::DELETE,
            "keys/00000000-0000-7000-8000-000000000000",
            None,
            404,
            "no key",
        ),
        (
            reqwest::Method::GET,
            "tenants?limit=1000",
            None,
            400,
            "`limit`",
        ),
    ] {
        let (got, _, body) = api.send(0, method.clone(), path, body, &[]).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{method} {path}: {body}");
    }

    // Every write of this test, in every region's audit log, newest first,
    // with who, where and what, and no key in it.
    for (region, name) in REGIONS.iter().enumerate() {
        until(CONVERGE, "every write in the audit log", || {
            let api = &api;
            async move {
                let (_, log) = api.get(region, "audit?limit=100").await;
                log["data"].as_array().is_some_and(|d| d.len() == 8)
            }
        })
        .await;
        let (_, log) = api.get(region, "audit?limit=100").await;
        assert!(!log.to_string().contains(&key), "a key in the audit log");
        let records: Vec<(String, String, String)> = log["data"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|r| {
                assert_eq!(r["actor"], "unauthenticated", "a plaintext mesh: {r}");
                assert!(
                    r["source"].as_str().unwrap().starts_with("127.0.0.1:"),
                    "{r}"
                );
                (
                    r["action"].as_str().unwrap().to_string(),
                    r["resource"].as_str().unwrap().to_string(),
                    r["region"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected: Vec<(String, String, String)> = [
            ("tenant.create", "tenants/acme".to_string(), "us-east"),
            ("tenant.update", "tenants/acme".to_string(), "us-east"),
            ("key.create", format!("keys/{key_id}"), "us-east"),
            ("key.revoke", format!("keys/{key_id}"), "ap-south"),
            ("tenant.create", "tenants/page-1".to_string(), "us-east"),
            ("tenant.create", "tenants/page-2".to_string(), "us-east"),
            ("tenant.create", "tenants/page-3".to_string(), "us-east"),
            ("tenant.create", "tenants/page-4".to_string(), "us-east"),
        ]
        .into_iter()
        .map(|(a, r, g)| (a.to_string(), r, g.to_string()))
        .collect();
        assert_eq!(records, expected, "audit log of {name}");
    }
}

/// The same operations as `meridian.v1.Admin` methods, on one region: the
/// same results, the same refusals as gRPC statuses, the same audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_operations_are_admin_methods_over_grpc() {
    use meridian_proto::v1::admin_client::AdminClient;
    use meridian_proto::v1::{
        Budget, CreateApiKeyRequest, GetTenantRequest, ListApiKeysRequest, ListAuditRequest,
        ListTenantsRequest, PutTenantRequest, RevokeApiKeyRequest,
    };
    init_logging();
    let region = meridian_tests::RegionSandbox::start("eu-west").await;
    let mut admin = AdminClient::connect(region.url()).await.unwrap();

    let put = |id: &str, rps: Option<u32>| PutTenantRequest {
        id: id.into(),
        display_name: None,
        requests_per_second: rps,
        tokens_per_minute: None,
        allowed_regions: vec![],
        budget: None,
        allowed_models: vec![],
    };
    let made = admin
        .put_tenant(put("acme", Some(5)))
        .await
        .unwrap()
        .into_inner();
    assert!(made.created);
    let tenant = made.tenant.unwrap();
    assert_eq!(
        (tenant.id.as_str(), tenant.requests_per_second),
        ("acme", Some(5))
    );
    assert_eq!(
        tenant.display_name, "acme",
        "a new tenant is named by its id"
    );
    let again = admin
        .put_tenant(put("acme", Some(7)))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    // A budget, and one refused by name.
    let budget = Budget {
        tokens: Some(1_000_000),
        usd: Some(25.5),
        period: "day".into(),
    };
    let budgeted = admin
        .put_tenant(PutTenantRequest {
            budget: Some(budget.clone()),
            ..put("beta", None)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budgeted.tenant.unwrap().budget, Some(budget));
    let refused = admin
        .put_tenant(PutTenantRequest {
            budget: Some(Budget {
                tokens: None,
                usd: Some(-1.0),
                period: String::new(),
            }),
            ..put("beta", None)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("`budget.usd`"), "{refused:?}");
    admin.put_tenant(put("beta", None)).await.unwrap();
    let got = admin
        .get_tenant(GetTenantRequest { id: "acme".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.requests_per_second, Some(7));
    let page = admin
        .list_tenants(ListTenantsRequest {
            limit: 1,
            after: String::new(),
            include_deleted: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.tenants.len(), page.has_more), (1, true));
    let rest = admin
        .list_tenants(ListTenantsRequest {
            limit: 0,
            after: "acme".into(),
            include_deleted: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.tenants[0].id, "beta");
    assert!(!rest.has_more);

    let key = admin
        .create_api_key(CreateApiKeyRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(key.secret.starts_with("mk-"));
    let id = key.key.unwrap().id;
    let keys = admin
        .list_api_keys(ListApiKeysRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert!(!format!("{keys:?}").contains(&key.secret));
    let revoked = admin
        .revoke_api_key(RevokeApiKeyRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    let twice = admin
        .revoke_api_key(RevokeApiKeyRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        twice.revoked_at, revoked.revoked_at,
        "revoking again changes nothing"
    );

    // Refusals, by status; none is written or audited.
    let status = admin.put_tenant(put("bad id", None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = admin
        .create_api_key(CreateApiKeyRequest {
            tenant: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = admin
        .revoke_api_key(RevokeApiKeyRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // Sync durability with no peer region to confirm it is refused before
    // the write.
    let mut sync = tonic::Request::new(put("gamma", None));
    sync.metadata_mut()
        .insert("x-meridian-durability", "sync".parse().unwrap());
    let status = admin.put_tenant(sync).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("sync"), "{status:?}");
    let status = admin
        .get_tenant(GetTenantRequest { id: "gamma".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // A tenant deleted over gRPC is left out of lists unless asked.
    let deleted = admin
        .delete_tenant(meridian_proto::v1::DeleteTenantRequest {
            id: "beta".into(),
            retention_seconds: Some(60),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted_at.is_some() && deleted.purge_at.is_some());
    let listed = |include_deleted| {
        let mut admin = admin.clone();
        async move {
            let page = admin
                .list_tenants(ListTenantsRequest {
                    limit: 0,
                    after: String::new(),
                    include_deleted,
                })
                .await
                .unwrap()
                .into_inner();
            page.tenants.into_iter().map(|t| t.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(false).await, ["acme"]);
    assert_eq!(listed(true).await, ["acme", "beta"]);

    let audit = admin
        .list_audit(ListAuditRequest {
            limit: 100,
            after: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<(&str, &str)> = audit
        .records
        .iter()
        .rev()
        .map(|r| (r.action.as_str(), r.resource.as_str()))
        .collect();
    let key_resource = format!("keys/{id}");
    assert_eq!(
        actions,
        [
            ("tenant.create", "tenants/acme"),
            ("tenant.update", "tenants/acme"),
            ("tenant.create", "tenants/beta"),
            ("tenant.update", "tenants/beta"),
            ("key.create", key_resource.as_str()),
            ("key.revoke", key_resource.as_str()),
            ("tenant.delete", "tenants/beta"),
        ]
    );
    assert!(audit.records.iter().all(|r| r.region == "eu-west"));
}

/// Data residency at the gateway: a tenant allowed only eu-west is served
/// there whatever region is nearest, refused (403) a pin to another region,
/// and answered 503 naming the rule while eu-west is down, while other
/// tenants fail over as before. And each tenant's key reads its own tenant
/// and keys, never another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_bound_to_one_region_is_served_only_there() {
    init_logging();
    // Readings replicate to every peer, so that residency is what keeps
    // the bound tenant's readings home.
    let everyone = |me: &str| {
        let others: Vec<String> = REGIONS
            .iter()
            .filter(|r| **r != me)
            .map(|r| format!("{r:?}"))
            .collect();
        format!("telemetry_peers = [{}]\n", others.join(", "))
    };
    let mut cluster =
        ClusterSandbox::start_replicated_each(&REGIONS, everyone, |regions, config| {
            config.auth = Some(AuthConfig {
                reload_interval_ms: 100,
                ..AuthConfig::new(regions[0].postgres.url())
            });
            config.geo.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        })
        .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let mut keys = Vec::new();
    for (tenant, body) in [
        ("eu-only", json!({ "allowed_regions": ["eu-west"] })),
        ("anywhere", json!({})),
    ] {
        let (status, _, made) = api
            .send(
                0,
                reqwest::Method::PUT,
                &format!("tenants/{tenant}"),
                Some(body),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{made}");
        let (_, _, key) = api
            .send(
                0,
                reqwest::Method::POST,
                &format!("tenants/{tenant}/keys"),
                None,
                &[],
            )
            .await;
        keys.push(key["key"].as_str().unwrap().to_string());
    }
    let (_, tenant) = api.get(0, "tenants/eu-only").await;
    assert_eq!(tenant["allowed_regions"], json!(["eu-west"]));
    let (status, _, body) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/x",
            Some(json!({ "allowed_regions": ["EU West"] })),
            &[],
        )
        .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("allowed_regions"))
    );

    let url = format!("{}/v1/chat/completions", cluster.gateway_url());
    let http = api.http.clone();
    let chat = |key: &str, headers: &[(&str, &str)]| {
        let mut req = http
            .post(&url)
            .bearer_auth(key)
            .json(&json!({ "model": TEST_MODEL, "max_tokens": 4,
                "messages": [{ "role": "user", "content": "hello" }] }));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let served = res
                .headers()
                .get("x-meridian-served-by")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (status, served, body)
        }
    };
    until(PROMPT, "the keys loaded", || {
        let chat = chat(&keys[1], &[]);
        async move { chat.await.0 == 200 }
    })
    .await;

    // From near us-east, eu-only is still served in eu-west; the other
    // tenant nearby.
    let near_us = [("x-meridian-client-country", "US")];
    for _ in 0..5 {
        let (status, served, body) = chat(&keys[0], &near_us).await;
        assert_eq!(
            (status, served.as_deref()),
            (200, Some("eu-west")),
            "{body}"
        );
    }
    let (_, served, _) = chat(&keys[1], &near_us).await;
    assert_eq!(served.as_deref(), Some("us-east"));
    // A pin to another region is refused by the rule.
    let (status, _, body) = chat(&keys[0], &[("x-meridian-region", "us-east")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant eu-only may be served only in eu-west"),
        "{body}"
    );

    // Each key reads its own tenant and keys, and nothing can name another.
    for (i, (key, tenant)) in keys.iter().zip(["eu-only", "anywhere"]).enumerate() {
        let get = |path: &str| {
            http.get(format!("{}/v1/{path}", cluster.gateway_url()))
                .bearer_auth(key)
                .send()
        };
        // Read in the region that serves the key, once the tenant made in
        // us-east has replicated there.
        until(CONVERGE, "the tenant readable with its own key", || {
            let get = get("tenant");
            async move { get.await.unwrap().status() == 200 }
        })
        .await;
        let own: Value = get("tenant").await.unwrap().json().await.unwrap();
        assert_eq!(own["id"], tenant, "{own}");
        let listed: Value = get("tenant/keys").await.unwrap().json().await.unwrap();
        let prefixes: Vec<&str> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["prefix"].as_str().unwrap())
            .collect();
        assert_eq!(prefixes.len(), 1, "{listed}");
        assert!(key.starts_with(prefixes[0]), "{listed}");
        assert!(
            !keys[1 - i].starts_with(prefixes[0]),
            "another tenant's key: {listed}"
        );
        assert!(!listed.to_string().contains(key.as_str()), "a key in clear");
    }

    // The bound tenant's conversation, job and readings stay in eu-west.
    // Its writes go first; the other tenant's, in eu-west too, follow in
    // the same log: once they are everywhere, anything of the bound
    // tenant's that replication would carry is everywhere too.
    let eu_west = sqlx::PgPool::connect(&cluster.region("eu-west").postgres.url())
        .await
        .unwrap();
    let at_eu = [("x-meridian-region", "eu-west")];
    for (i, tenant) in ["eu-only", "anywhere"].into_iter().enumerate() {
        let key = &keys[i];
        let conversation = [
            at_eu[0],
            ("x-meridian-conversation", "trip-plans"),
            ("x-meridian-durability", "async"),
        ];
        let (status, served, body) = chat(key, &conversation).await;
        assert_eq!(
            (status, served.as_deref()),
            (200, Some("eu-west")),
            "{body}"
        );
        let res = http
            .post(format!("{}/v1/jobs", cluster.gateway_url()))
            .bearer_auth(key)
            .header(at_eu[0].0, at_eu[0].1)
            .json(&json!({ "model": TEST_MODEL, "max_tokens": 4,
                "messages": [{ "role": "user", "content": "later" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        let now = chrono::Utc::now();
        let readings: Vec<Value> = (0..3)
            .map(|n| {
                json!({ "device_id": "thermo", "metric": "celsius", "value": n,
                    "ts": (now - chrono::Duration::seconds(n)).to_rfc3339() })
            })
            .collect();
        let res = http
            .post(format!("{}/v1/telemetry", cluster.gateway_url()))
            .bearer_auth(key)
            .header(at_eu[0].0, at_eu[0].1)
            .json(&readings)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
        // The job's last replicated write, its end, before the next
        // tenant's writes.
        until(CONVERGE, "the job finished in eu-west", || {
            let eu_west = eu_west.clone();
            async move {
                let done: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM jobs WHERE tenant = $1 AND state = 'succeeded'",
                )
                .bind(tenant)
                .fetch_one(&eu_west)
                .await
                .unwrap();
                done == 1
            }
        })
        .await;
    }
    // conversation, messages (a user turn, an answer), job, readings
    let all = [1, 2, 1, 3];
    assert_eq!(held(&eu_west, "eu-only").await, all);
    for region in ["us-east", "ap-south"] {
        let pool = sqlx::PgPool::connect(&cluster.region(region).postgres.url())
            .await
            .unwrap();
        until(CONVERGE, "the other tenant's rows replicated", || {
            let pool = pool.clone();
            async move { held(&pool, "anywhere").await == all }
        })
        .await;
        assert_eq!(
            held(&pool, "eu-only").await,
            [0, 0, 0, 0],
            "eu-only's rows reached {region}"
        );
    }
    // A snapshot eu-west serves to a peer leaves them out too.
    let snapshot = snapshot_rows(&cluster.region("eu-west").url(), "us-east").await;
    let of = |tenant: &str| {
        snapshot
            .iter()
            .filter(|(table, payload)| {
                ["conversations", "conversation_messages", "jobs"].contains(&table.as_str())
                    && (payload["tenant_id"] == tenant || payload["tenant"] == tenant)
            })
            .count()
    };
    assert_eq!((of("eu-only"), of("anywhere")), (0, 4));

    // eu-west down: the bound tenant gets a 503 naming the rule, never
    // another region; the other tenant fails over.
    cluster.region("eu-west").kill_node();
    until(CONVERGE, "eu-only refused while eu-west is down", || {
        let chat = chat(&keys[0], &near_us);
        async move {
            let (status, served, body) = chat.await;
            assert_ne!(
                served.as_deref(),
                Some("us-east"),
                "served outside its region"
            );
            assert_ne!(
                served.as_deref(),
                Some("ap-south"),
                "served outside its region"
            );
            status == 503
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("none of them is available"))
        }
    })
    .await;
    let (status, served, _) = chat(&keys[1], &[("x-meridian-client-country", "IE")]).await;
    assert_eq!(status, 200);
    assert_ne!(served.as_deref(), Some("eu-west"));
}

/// Rows of `tenant` in the database behind `pool`: conversations, their
/// messages, jobs and telemetry readings.
async fn held(pool: &sqlx::PgPool, tenant: &str) -> [i64; 4] {
    let (c, m, j, r): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversations WHERE tenant_id = $1),
                (SELECT count(*) FROM conversation_messages WHERE tenant_id = $1),
                (SELECT count(*) FROM jobs WHERE tenant = $1),
                (SELECT count(*) FROM telemetry_readings WHERE tenant = $1)",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await
    .unwrap();
    [c, m, j, r]
}

/// Every row of the snapshot `url`'s region serves to `peer`, as (table,
/// payload).
async fn snapshot_rows(url: &str, peer: &str) -> Vec<(String, Value)> {
    let mut client = ReplicationClient::connect(url.to_string()).await.unwrap();
    let mut stream = client
        .snapshot(SnapshotRequest {
            peer_region: peer.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut rows = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        for change in chunk.changes {
            if !change.payload.is_empty() {
                rows.push((
                    change.table,
                    serde_json::from_slice(&change.payload).unwrap(),
                ));
            }
        }
    }
    rows
}

#[tokio::test]
async fn a_route_changed_in_one_region_serves_from_all_three() {
    use meridian_tests::TEST_SLOW_MODEL;
    init_logging();
    // us-east and eu-west also serve `sim-eu`; ap-south does not.
    let cluster = ClusterSandbox::start_replicated_configured(
        &REGIONS,
        |name| match name {
            "ap-south" => String::new(),
            _ => "[[models]]\nid = \"sim-eu\"\nbackend = { kind = \"sim\" }\n".into(),
        },
        |_| String::new(),
        |_, _| {},
    )
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let http = api.http.clone();
    let gateway = cluster.gateway_url();
    // The model that answered `model` in `region`, or the refusal.
    let served = |model: &str, region: &str| {
        let req = http
            .post(format!("{gateway}/v1/chat/completions"))
            .header("x-meridian-region", region)
            .json(&json!({ "model": model, "max_tokens": 2,
                "messages": [{ "role": "user", "content": "hi" }] }));
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap();
            (
                status,
                body["model"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    let everywhere = |model: &'static str, expect: &'static str| {
        let served = &served;
        async move {
            until(
                CONVERGE,
                &format!("{model} served by {expect} everywhere"),
                || async {
                    let mut all = true;
                    for region in REGIONS {
                        all &= served(model, region).await == (200, expect.to_string());
                    }
                    all
                },
            )
            .await;
        }
    };

    let route = |id: &str, region: usize, body: Value| {
        let path = format!("routes/{id}");
        let api = &api;
        async move {
            api.send(region, reqwest::Method::PUT, &path, Some(body), &[])
                .await
        }
    };
    let (status, _, made) =
        route("assistant", 0, json!({ "weights": { TEST_SLOW_MODEL: 1 } })).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(
        (&made["source"], &made["applied"]),
        (&json!("api"), &json!(true))
    );
    everywhere("assistant", TEST_SLOW_MODEL).await;
    // Changed in eu-west: every region follows.
    let (status, _, changed) = route(
        "assistant",
        1,
        json!({ "weights": { TEST_MODEL: 1 }, "fallbacks": [TEST_SLOW_MODEL] }),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    everywhere("assistant", TEST_MODEL).await;
    let (_, models) = api_models(&http, &cluster.regions[2].url()).await;
    assert!(models.contains(&"assistant".to_string()), "{models:?}");

    // A route one region cannot serve: the others serve it, that region
    // says why and answers 404 for it, and refuses to take it itself.
    let (status, _, made) = route("eu-special", 0, json!({ "weights": { "sim-eu": 1 } })).await;
    assert_eq!(status, 201, "{made}");
    until(CONVERGE, "eu-west serves eu-special", || async {
        served("eu-special", "eu-west").await == (200, "sim-eu".to_string())
    })
    .await;
    until(CONVERGE, "ap-south knows eu-special", || async {
        api.get(2, "routes/eu-special").await.0 == 200
    })
    .await;
    let (_, seen) = api.get(2, "routes/eu-special").await;
    let view = &seen["data"][0];
    assert_eq!(view["applied"], false, "{seen}");
    assert!(
        view["problem"]
            .as_str()
            .unwrap()
            .contains("names \"sim-eu\", which is not a model of this region"),
        "{seen}"
    );
    assert_eq!(served("eu-special", "ap-south").await.0, 404);
    let (status, _, refused) = route("eu-special", 2, json!({ "weights": { "sim-eu": 2 } })).await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("region ap-south cannot serve this route"),
        "{refused}"
    );
    for (body, says) in [
        (
            json!({ "weights": { TEST_MODEL: 1 }, "small": TEST_MODEL }),
            "not both",
        ),
        (
            json!({ "id": "x", "weights": { TEST_MODEL: 1 } }),
            "in its path",
        ),
        (
            json!({ "weights": { TEST_MODEL: 1 }, "colour": "red" }),
            "unknown field",
        ),
        (
            json!({ "weights": { TEST_MODEL: 1 } }),
            "is a model of this region",
        ),
    ] {
        let id = if says.contains("is a model") {
            TEST_MODEL
        } else {
            "bad"
        };
        let (status, _, refused) = route(id, 0, body).await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"]["message"].as_str().unwrap().contains(says),
            "{says}: {refused}"
        );
    }

    // Deleted in ap-south: gone everywhere.
    let (status, _, _) = api
        .send(2, reqwest::Method::DELETE, "routes/assistant", None, &[])
        .await;
    assert_eq!(status, 200);
    until(CONVERGE, "assistant gone everywhere", || async {
        let mut gone = true;
        for region in REGIONS {
            gone &= served("assistant", region).await.0 == 404;
        }
        gone
    })
    .await;
    let (_, audit) = api.get(0, "audit?limit=100").await;
    let actions: Vec<(&str, &str)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["resource"].as_str().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("route.create", "routes/assistant"),
        ("route.update", "routes/assistant"),
        ("route.create", "routes/eu-special"),
        ("route.delete", "routes/assistant"),
    ] {
        assert!(actions.contains(&expected), "{expected:?} in {actions:?}");
    }
}

/// The model ids a region lists.
async fn api_models(http: &reqwest::Client, url: &str) -> (u16, Vec<String>) {
    let res = http.get(format!("{url}/v1/models")).send().await.unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    let ids = body["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    (status, ids)
}

#[tokio::test]
async fn operators_drain_and_weigh_regions_for_every_gateway() {
    init_logging();
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |regions, config| {
        config.auth = Some(AuthConfig {
            reload_interval_ms: 100,
            ..AuthConfig::new(regions[0].postgres.url())
        });
        config.geo.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let (_, _, _) = api
        .send(0, reqwest::Method::PUT, "tenants/t", Some(json!({})), &[])
        .await;
    let (_, _, key) = api
        .send(0, reqwest::Method::POST, "tenants/t/keys", None, &[])
        .await;
    let key = key["key"].as_str().unwrap().to_string();
    let http = api.http.clone();
    let gateway = cluster.gateway_url();
    // The region that served a request from Ireland.
    let from_ireland = || {
        let req = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-meridian-client-country", "IE")
            .json(&json!({ "model": TEST_MODEL, "max_tokens": 2,
                "messages": [{ "role": "user", "content": "hi" }] }));
        async move {
            let res = req.send().await.unwrap();
            match res.headers().get("x-meridian-served-by") {
                Some(region) if res.status() == 200 => region.to_str().unwrap().to_string(),
                _ => format!("status {}", res.status()),
            }
        }
    };
    until(CONVERGE, "served in eu-west", || async {
        from_ireland().await == "eu-west"
    })
    .await;
    let routing = || async {
        let body: Value = reqwest::get(format!("{}/routing", cluster.admin_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "eu-west")
            .unwrap()
            .clone()
    };

    // Drained through us-east's API: the gateway reads the control with
    // its keys and stops sending eu-west new work.
    let control = |body: Value| {
        let api = &api;
        async move {
            api.send(
                0,
                reqwest::Method::PUT,
                "regions/eu-west",
                Some(body),
                &[("x-meridian-durability", "sync")],
            )
            .await
        }
    };
    let (status, _, drained) =
        control(json!({ "drained": true, "reason": "kernel upgrade" })).await;
    assert_eq!(status, 200, "{drained}");
    assert_eq!(
        (&drained["drained"], &drained["weight"]),
        (&json!(true), &json!(100))
    );
    until(CONVERGE, "eu-west drained at the gateway", || async {
        let r = routing().await;
        r["operator"]["drained"] == true && r["available"] == false
    })
    .await;
    for _ in 0..10 {
        let served = from_ireland().await;
        assert!(
            ["us-east", "ap-south"].contains(&served.as_str()),
            "{served}"
        );
    }
    let (_, listed) = api.get(2, "regions").await;
    assert_eq!(listed["data"][0]["reason"], "kernel upgrade", "{listed}");

    // Undrained at half weight: about half of Ireland's requests.
    let (status, _, _) = control(json!({ "drained": false, "weight": 50 })).await;
    assert_eq!(status, 200);
    until(CONVERGE, "eu-west back at weight 50", || async {
        let r = routing().await;
        r["operator"] == json!({ "drained": false, "weight": 50 })
    })
    .await;
    let mut eu = 0;
    for _ in 0..20 {
        let served = futures::future::join_all((0..20).map(|_| from_ireland())).await;
        eu += served.iter().filter(|s| *s == "eu-west").count();
    }
    assert!(
        (140..=260).contains(&eu),
        "eu-west served {eu} of 400 at weight 50"
    );
    let (status, _, _) = control(json!({ "weight": 100 })).await;
    assert_eq!(status, 200);
    until(CONVERGE, "eu-west takes all of Ireland again", || async {
        routing().await["operator"]["weight"] == 100
    })
    .await;
    for _ in 0..10 {
        assert_eq!(from_ireland().await, "eu-west");
    }

    for (path, body, says) in [
        ("regions/eu-west", json!({ "weight": 101 }), "from 0 to 100"),
        (
            "regions/EU",
            json!({ "drained": true }),
            "not a region name",
        ),
        ("regions/eu-west", json!({ "drain": true }), "unknown field"),
    ] {
        let (status, _, refused) = api
            .send(1, reqwest::Method::PUT, path, Some(body), &[])
            .await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"]["message"].as_str().unwrap().contains(says),
            "{refused}"
        );
    }
    let (_, audit) = api.get(0, "audit?limit=100").await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resource"] == "regions/eu-west")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["region.update", "region.undrain", "region.drain"]);
}

#[tokio::test]
async fn keys_carry_names_expiry_and_models_and_rotate_with_a_grace_period() {
    use meridian_tests::TEST_SLOW_MODEL;
    init_logging();
    let cluster = ClusterSandbox::start_configured(
        &["eu-west"],
        |_| String::new(),
        |regions, config| {
            config.auth = Some(AuthConfig {
                reload_interval_ms: 100,
                ..AuthConfig::new(regions[0].postgres.url())
            });
        },
    )
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: vec![cluster.regions[0].url()],
    };
    let (status, _, tenant) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/scoped",
            Some(json!({ "allowed_models": [TEST_MODEL, TEST_SLOW_MODEL] })),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{tenant}");
    assert_eq!(
        tenant["allowed_models"],
        json!([TEST_MODEL, TEST_SLOW_MODEL])
    );
    let new_key = |body: Value| {
        let api = &api;
        async move {
            let (status, _, key) = api
                .send(
                    0,
                    reqwest::Method::POST,
                    "tenants/scoped/keys",
                    Some(body),
                    &[],
                )
                .await;
            assert_eq!(status, 201, "{key}");
            key
        }
    };
    let expires = chrono::Utc::now() + chrono::Duration::seconds(4);
    let narrow = new_key(json!({ "name": "ci", "labels": { "team": "search" },
        "allowed_models": [TEST_MODEL], "expires_at": expires.to_rfc3339() }))
    .await;
    assert_eq!(
        (
            &narrow["name"],
            &narrow["labels"],
            &narrow["allowed_models"]
        ),
        (
            &json!("ci"),
            &json!({ "team": "search" }),
            &json!([TEST_MODEL])
        )
    );
    let wide = new_key(json!({})).await;
    let http = api.http.clone();
    let gateway = cluster.gateway_url();
    let chat = |key: &Value, model: &str, claim: Option<&str>| {
        let mut req = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key["key"].as_str().unwrap())
            .json(&json!({ "model": model, "max_tokens": 2,
                "messages": [{ "role": "user", "content": "hi" }] }));
        if let Some(claim) = claim {
            req = req.header("x-meridian-allowed-models", claim);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    until(PROMPT, "the keys loaded", || async {
        chat(&wide, TEST_MODEL, None).await.0 == 200
    })
    .await;
    assert_eq!(chat(&narrow, TEST_MODEL, None).await.0, 200);
    // A model outside the key's list, even when the client claims more.
    for claim in [None, Some(TEST_SLOW_MODEL)] {
        let (status, refused) = chat(&narrow, TEST_SLOW_MODEL, claim).await;
        assert_eq!(status, 403, "{refused}");
        assert_eq!(refused["error"]["code"], "model_not_allowed", "{refused}");
        assert!(
            refused["error"]["message"].as_str().unwrap().contains(
                "may not use model \"sim-slow\": its key or tenant allows only [sim-fast]"
            ),
            "{refused}"
        );
    }
    let res = http
        .post(format!("{gateway}/v1/jobs"))
        .bearer_auth(narrow["key"].as_str().unwrap())
        .json(&json!({ "model": TEST_SLOW_MODEL, "max_tokens": 2,
            "messages": [{ "role": "user", "content": "later" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "a job for a model the key may not use");
    // The tenant's list bounds a key without one of its own.
    assert_eq!(chat(&wide, TEST_SLOW_MODEL, None).await.0, 200);
    assert_eq!(chat(&wide, "sim-other", None).await.0, 403);

    // Rotation: the new key works at once, the old one for its grace.
    let (status, _, rotated) = api
        .send(
            0,
            reqwest::Method::POST,
            &format!("keys/{}/rotate", wide["id"].as_str().unwrap()),
            Some(json!({ "grace_seconds": 2 })),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{rotated}");
    assert!(rotated["rotated"]["expires_at"].is_string(), "{rotated}");
    until(PROMPT, "the rotated key works", || async {
        chat(&rotated, TEST_MODEL, None).await.0 == 200
    })
    .await;
    assert_eq!(
        chat(&wide, TEST_MODEL, None).await.0,
        200,
        "within its grace"
    );
    until(CONVERGE, "the old key stops after its grace", || async {
        chat(&wide, TEST_MODEL, None).await.0 == 401
    })
    .await;
    let (_, refused) = chat(&wide, TEST_MODEL, None).await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has expired"),
        "{refused}"
    );
    // The narrow key expires on its own.
    until(CONVERGE, "the key expires", || async {
        let (status, body) = chat(&narrow, TEST_MODEL, None).await;
        status == 401
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("This API key has expired"))
    })
    .await;
    assert_eq!(chat(&rotated, TEST_MODEL, None).await.0, 200);

    let (_, listed) = api.get(0, "tenants/scoped/keys").await;
    let ci = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap()
        .clone();
    assert_eq!(ci["labels"]["team"], "search", "{listed}");
    assert!(ci["expires_at"].is_string(), "{listed}");
    for (path, body, says) in [
        (
            "tenants/scoped/keys",
            json!({ "expires_at": "2020-01-01T00:00:00Z" }),
            "is not in the future",
        ),
        (
            "tenants/scoped/keys",
            json!({ "allowed_models": [] }),
            "1 to 256 models",
        ),
        (
            "tenants/scoped/keys",
            json!({ "colour": "red" }),
            "unknown field",
        ),
    ] {
        let (status, _, refused) = api
            .send(0, reqwest::Method::POST, path, Some(body), &[])
            .await;
        assert_eq!(status, 400, "{refused}");
        assert!(
            refused["error"]["message"].as_str().unwrap().contains(says),
            "{says}: {refused}"
        );
    }
    let (status, _, refused) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/scoped",
            Some(json!({ "allowed_models": ["a,b"] })),
            &[],
        )
        .await;
    assert_eq!(
        (status, &refused["error"]["param"]),
        (400, &json!("allowed_models"))
    );
    let (_, audit) = api.get(0, "audit?limit=100").await;
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "key.rotate"),
        "{audit}"
    );
}

/// Operators reach the management API through the gateway with an
/// operator token: made in us-east, it works on calls the gateway sends to
/// every region once replicated; the gateway refuses a call with no token
/// or with an API key before any region sees it; revoked in ap-south, the
/// token stops everywhere within the replication lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reach_the_management_api_through_the_gateway_with_a_token() {
    init_logging();
    let cluster = ClusterSandbox::start_replicated(&REGIONS, "", |regions, config| {
        config.auth = Some(AuthConfig {
            reload_interval_ms: 100,
            ..AuthConfig::new(regions[1].postgres.url())
        });
    })
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let (status, _, made) = api
        .send(
            0,
            reqwest::Method::POST,
            "operator-tokens",
            Some(json!({ "name": "terraform", "role": "admin" })),
            &[("x-meridian-durability", "sync")],
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let token = made["token"].as_str().unwrap().to_string();
    let edge = |method: reqwest::Method, path: &str, bearer: Option<&str>, region: &str| {
        let mut req = api
            .http
            .request(method, format!("{}/admin/v1/{path}", cluster.gateway_url()))
            .header("x-meridian-region", region);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let res = req.send().await.unwrap();
            let served = res
                .headers()
                .get("x-meridian-region")
                .map(|v| v.to_str().unwrap().to_string());
            (
                res.status().as_u16(),
                served,
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    // The token works on calls to every region, each checking it itself.
    for region in REGIONS {
        let token = token.clone();
        until(CONVERGE, &format!("the token accepted in {region}"), || {
            let call = edge(reqwest::Method::GET, "tenants", Some(&token), region);
            async move { call.await.0 == 200 }
        })
        .await;
    }
    let res = api
        .http
        .put(format!("{}/admin/v1/tenants/acme", cluster.gateway_url()))
        .header("x-meridian-region", "eu-west")
        .bearer_auth(&token)
        .json(&json!({ "display_name": "Acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["x-meridian-region"], "eu-west");
    let (_, audit) = api.get(1, "audit?limit=1").await;
    let actor = audit["data"][0]["actor"].as_str().unwrap();
    assert!(actor.starts_with("token:terraform via "), "{audit}");
    assert_eq!(audit["data"][0]["region"], "eu-west");

    // No token, or an API key: the gateway refuses, naming what it takes.
    let (status, _, body) = edge(reqwest::Method::GET, "tenants", None, "us-east").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("invalid_operator_token")),
        "{body}"
    );
    let (_, _, key) = api
        .send(1, reqwest::Method::POST, "tenants/acme/keys", None, &[])
        .await;
    let key = key["key"].as_str().unwrap();
    let (status, _, body) = edge(reqwest::Method::GET, "tenants", Some(key), "us-east").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("operator token"),
        "{body}"
    );
    // The same over gRPC: the Admin service through the gateway, with the
    // token as metadata.
    let mut admin = meridian_proto::v1::admin_client::AdminClient::connect(cluster.gateway_url())
        .await
        .unwrap();
    let list = |bearer: Option<&str>| {
        let mut req = tonic::Request::new(meridian_proto::v1::ListTenantsRequest {
            limit: 0,
            after: String::new(),
            include_deleted: false,
        });
        req.metadata_mut()
            .insert("x-meridian-region", "eu-west".parse().unwrap());
        if let Some(b) = bearer {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        req
    };
    let page = admin.list_tenants(list(Some(&token))).await.unwrap();
    assert_eq!(
        page.metadata().get("x-meridian-served-by").unwrap(),
        "eu-west"
    );
    assert_eq!(page.into_inner().tenants[0].id, "acme");
    let e = admin.list_tenants(list(None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin
        .list_tenants(list(Some("mop-unknown")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A region's other operator endpoints stay off the edge, token or not.
    let res = api
        .http
        .post(format!("{}/admin/reload", cluster.gateway_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    // Revoked in ap-south, it stops in every region within the lag.
    let id = made["id"].as_str().unwrap();
    let (status, _, _) = api
        .send(
            2,
            reqwest::Method::DELETE,
            &format!("operator-tokens/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200);
    for region in REGIONS {
        let token = token.clone();
        until(
            CONVERGE,
            &format!("the revoked token refused in {region}"),
            || {
                let call = edge(reqwest::Method::GET, "tenants", Some(&token), region);
                async move { call.await.0 == 401 }
            },
        )
        .await;
    }
    let (_, audit) = api.get(0, "audit?limit=20").await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"operator_token.create") && actions.contains(&"operator_token.revoke"),
        "{actions:?}"
    );
}

/// The peers a management read's answer may be behind, as the region
/// reports it: each by name, in milliseconds, small while replication
/// flows; a region killed grows while the live one stays small. Writes
/// carry no such header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_reads_say_how_far_behind_each_region_they_may_be() {
    use meridian_proto::v1::ListTenantsRequest;
    use meridian_proto::v1::admin_client::AdminClient;
    init_logging();
    let mut cluster = ClusterSandbox::start_replicated(&REGIONS, "", |_, _| {}).await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let behind = |headers: &reqwest::header::HeaderMap| -> Vec<(String, Option<u64>)> {
        headers
            .get("x-meridian-replication-behind")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
            .split(", ")
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (peer, ms) = pair.split_once('=').unwrap();
                (peer.to_string(), ms.parse().ok())
            })
            .collect()
    };
    let read = || {
        let (http, url) = (api.http.clone(), api.urls[0].clone());
        async move {
            let res = http
                .get(format!("{url}/admin/v1/tenants"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            res.headers().clone()
        }
    };
    // Caught up with both peers, each read says so in small figures.
    until(CONVERGE, "us-east caught up with both peers", || {
        let read = read();
        async move {
            let b = behind(&read.await);
            b.len() == 2 && b.iter().all(|(_, ms)| ms.is_some_and(|ms| ms < 2_000))
        }
    })
    .await;
    let peers: Vec<String> = behind(&read().await).into_iter().map(|(p, _)| p).collect();
    assert_eq!(peers, ["ap-south", "eu-west"]);
    let (status, headers, _) = api
        .send(
            0,
            reqwest::Method::PUT,
            "tenants/acme",
            Some(json!({ "display_name": "Acme" })),
            &[],
        )
        .await;
    assert_eq!(status, 201);
    assert!(headers.get("x-meridian-replication-behind").is_none());
    // The same as gRPC metadata on the Admin reads.
    let mut admin = AdminClient::connect(api.urls[0].clone()).await.unwrap();
    let listed = admin
        .list_tenants(ListTenantsRequest {
            limit: 0,
            after: String::new(),
            include_deleted: false,
        })
        .await
        .unwrap();
    let value = listed
        .metadata()
        .get("x-meridian-replication-behind")
        .expect("the header as metadata")
        .to_str()
        .unwrap();
    assert!(
        value.starts_with("ap-south=") && value.contains(", eu-west="),
        "{value}"
    );

    // ap-south killed: what us-east says of it grows past what it can have
    // missed, while eu-west stays fresh.
    cluster.region("ap-south").kill_node();
    until(CONVERGE, "ap-south reported stale", || {
        let read = read();
        async move {
            let b = behind(&read.await);
            b[0].1.is_some_and(|ms| ms >= 3_000) && b[1].1.is_some_and(|ms| ms < 2_000)
        }
    })
    .await;
}

/// A tenant deleted through the API stops at once (its keys are refused
/// by the gateway within 2 s), is left out of lists unless asked, may be
/// restored by a `PUT` until its retention ends (without its old keys),
/// and once the retention has passed every region erases its keys,
/// conversations, messages, jobs and readings, while another tenant's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tenant_stops_at_once_and_every_region_erases_its_data_after_retention() {
    init_logging();
    let cluster = ClusterSandbox::start_replicated(
        &REGIONS,
        "prune_interval_ms = 200\n",
        |regions, config| {
            config.auth = Some(AuthConfig {
                reload_interval_ms: 100,
                ..AuthConfig::new(regions[1].postgres.url())
            });
        },
    )
    .await;
    let api = Api {
        http: reqwest::Client::new(),
        urls: cluster.regions.iter().map(|r| r.url()).collect(),
    };
    let sync = [("x-meridian-durability", "sync")];
    let mut keys = Vec::new();
    for tenant in ["gone", "stays"] {
        let (status, _, _) = api
            .send(
                0,
                reqwest::Method::PUT,
                &format!("tenants/{tenant}"),
                Some(json!({})),
                &sync,
            )
            .await;
        assert_eq!(status, 201);
        let (_, _, key) = api
            .send(
                0,
                reqwest::Method::POST,
                &format!("tenants/{tenant}/keys"),
                None,
                &sync,
            )
            .await;
        keys.push(key["key"].as_str().unwrap().to_string());
    }
    let http = api.http.clone();
    let gateway = cluster.gateway_url();
    let chat = |key: &str, conversation: Option<&str>| {
        let mut req = http
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-meridian-region", "us-east")
            .json(&json!({ "model": TEST_MODEL, "max_tokens": 4,
                "messages": [{ "role": "user", "content": "hello" }] }));
        if let Some(c) = conversation {
            req = req
                .header("x-meridian-conversation", c)
                .header("x-meridian-durability", "sync");
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for key in &keys {
        until(PROMPT, "the key loaded", || {
            let chat = chat(key, None);
            async move { chat.await == 200 }
        })
        .await;
        // A stored conversation (a user turn and an answer), replicated.
        assert_eq!(chat(key, Some("notes")).await, 200);
    }
    let pools: Vec<sqlx::PgPool> = {
        let mut pools = Vec::new();
        for region in &cluster.regions {
            pools.push(sqlx::PgPool::connect(&region.postgres.url()).await.unwrap());
        }
        pools
    };
    for pool in &pools {
        until(CONVERGE, "both tenants' conversations everywhere", || {
            let pool = pool.clone();
            async move {
                held(&pool, "gone").await[..2] == [1, 2]
                    && held(&pool, "stays").await[..2] == [1, 2]
            }
        })
        .await;
    }

    // Deleted in ap-south with a long retention: refused within 2 s,
    // listed only when asked, restored by a PUT without its old key.
    let (status, _, deleted) = api
        .send(
            2,
            reqwest::Method::DELETE,
            "tenants/gone?retention_seconds=3600",
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200, "{deleted}");
    assert!(
        deleted["deleted_at"].is_string() && deleted["purge_at"].is_string(),
        "{deleted}"
    );
    assert_eq!(deleted["live_keys"], 0);
    let at = Instant::now();
    until(PROMPT, "the deleted tenant's key refused", || {
        let chat = chat(&keys[0], None);
        async move { chat.await == 401 }
    })
    .await;
    eprintln!("deleted tenant refused after {:?}", at.elapsed());
    assert_eq!(chat(&keys[1], None).await, 200);
    let (_, listed) = api.get(2, "tenants").await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stays"]);
    let (_, listed) = api.get(2, "tenants?include_deleted=true").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    let (status, _, _) = api
        .send(2, reqwest::Method::POST, "tenants/gone/keys", None, &[])
        .await;
    assert_eq!(status, 404, "a deleted tenant takes no new key");
    let (status, _, restored) = api
        .send(
            2,
            reqwest::Method::PUT,
            "tenants/gone",
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(
        (&restored["deleted_at"], &restored["live_keys"]),
        (&Value::Null, &json!(0))
    );
    assert_eq!(
        chat(&keys[0], None).await,
        401,
        "a restored tenant's old key came back"
    );

    // Deleted again, in the region that restored it (a delete elsewhere
    // could arrive before the restore and be a no-op there), with a 1 s
    // retention: every region erases its rows.
    let (status, _, _) = api
        .send(
            2,
            reqwest::Method::DELETE,
            "tenants/gone?retention_seconds=1",
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200);
    for (pool, region) in pools.iter().zip(REGIONS) {
        until(CONVERGE, &format!("gone's data erased in {region}"), || {
            let pool = pool.clone();
            async move {
                let keys: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE tenant_id = 'gone'")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                held(&pool, "gone").await == [0, 0, 0, 0] && keys == 0
            }
        })
        .await;
        assert_eq!(held(pool, "stays").await[..2], [1, 2], "{region}");
    }
    let (_, audit) = api.get(0, "audit?limit=20").await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .filter(|a| a.starts_with("tenant."))
        .collect();
    assert_eq!(
        actions[..3],
        ["tenant.delete", "tenant.restore", "tenant.delete"]
    );
}
