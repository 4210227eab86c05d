//! `meridian tenants` and `meridian audit` against a region over mutual
//! TLS, with an operator certificate in the layout `meridian certs` writes:
//! what they print, that the region audits the operator's identity, and
//! that a refusal is one line naming the problem.

use std::process::{Command, Output};

use meridian_mesh::Identity;
use meridian_tests::{RegionSandbox, TestPki, init_logging};
use serde_json::Value;

struct Cli {
    args: Vec<String>,
}

impl Cli {
    async fn run(&self, command: &[&str]) -> Output {
        let args: Vec<String> = command
            .iter()
            .map(|s| s.to_string())
            .chain(self.args.iter().cloned())
            .collect();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_meridian"))
                .args(args)
                .output()
                .expect("meridian runs")
        })
        .await
        .unwrap()
    }

    async fn json(&self, command: &[&str]) -> Value {
        let mut command = command.to_vec();
        command.push("--json");
        let out = self.run(&command).await;
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_tenants_and_keys_with_the_cli_over_mtls() {
    init_logging();
    let pki = TestPki::new();
    let config = format!(
        "{}[mesh.policy]\nread_only = [\"spiffe://meridian/operator/viewer\"]\n",
        pki.region_toml("eu-west")
    );
    let region = RegionSandbox::start_with_config("eu-west", &config).await;
    let operator = pki.write(&Identity::operator("admin").unwrap());
    pki.write(&Identity::operator("viewer").unwrap());
    let certs = operator.ca_path.parent().unwrap().display().to_string();
    let cli = Cli {
        args: vec![
            "--region".into(),
            format!("https://{}", region.addr()),
            "--region-name".into(),
            "eu-west".into(),
            "--certs".into(),
            certs.clone(),
        ],
    };

    let put = cli
        .json(&["tenants", "put", "acme", "--rps", "5", "--name", "Acme"])
        .await;
    assert_eq!(put["created"], true, "{put}");
    assert_eq!(put["tenant"]["requests_per_second"], 5);
    let out = cli.run(&["tenants", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("ID") && table.contains("acme  Acme  5"),
        "{table}"
    );

    // The key alone on stdout, for scripts.
    let out = cli.run(&["tenants", "create-key", "acme"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("mk-") && !key.contains(' '), "{key:?}");
    let keys = cli.json(&["tenants", "keys", "acme"]).await;
    let id = keys["data"][0]["id"].as_str().unwrap().to_string();
    assert!(!keys.to_string().contains(&key));
    let revoked = cli.json(&["tenants", "revoke-key", &id]).await;
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    // The region audited the operator's identity.
    let audit = cli.json(&["audit"]).await;
    let records = audit["data"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{audit}");
    for r in records {
        assert_eq!(r["actor"], "spiffe://meridian/operator/admin", "{r}");
    }
    assert_eq!(records[0]["action"], "key.revoke");

    // A read-only operator reads, and is refused any write, which leaves
    // nothing behind.
    let viewer = Cli {
        args: [cli.args.clone(), vec!["--operator".into(), "viewer".into()]].concat(),
    };
    let listed = viewer.json(&["tenants", "list"]).await;
    assert_eq!(listed["data"][0]["id"], "acme", "{listed}");
    let out = viewer.run(&["tenants", "put", "mallory"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spiffe://meridian/operator/viewer may only read")
            && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    let out = viewer.run(&["tenants", "get", "mallory"]).await;
    assert!(!out.status.success(), "the refused write happened");
    assert_eq!(
        cli.json(&["audit"]).await["data"].as_array().unwrap().len(),
        3
    );

    // Refusals: one line naming the problem, and a failing exit.
    let out = cli.run(&["tenants", "get", "nobody"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no tenant \"nobody\""), "{stderr}");
    let out = Cli {
        args: vec!["--region".into(), format!("https://{}", region.addr())],
    }
    .run(&["tenants", "list"])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`--certs DIR` is required"), "{stderr}");

    // Deleted, a tenant leaves the list unless asked for, and `put`
    // restores it.
    let deleted = cli
        .json(&["tenants", "delete", "acme", "--retention-days", "7"])
        .await;
    assert!(
        deleted["deleted_at"].is_string() && deleted["purge_at"].is_string(),
        "{deleted}"
    );
    let listed = cli.json(&["tenants", "list"]).await;
    assert_eq!(listed["data"], serde_json::json!([]), "{listed}");
    let listed = cli.json(&["tenants", "list", "--include-deleted"]).await;
    assert_eq!(listed["data"][0]["id"], "acme", "{listed}");
    let restored = cli.json(&["tenants", "put", "acme"]).await;
    assert_eq!(
        restored["tenant"]["deleted_at"],
        serde_json::Value::Null,
        "{restored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_routes_regions_prices_and_usage_with_the_cli() {
    init_logging();
    let pki = TestPki::new();
    let config = format!(
        "{}[mesh.policy]\nread_only = [\"spiffe://meridian/operator/viewer\"]\n",
        pki.region_toml("eu-west")
    );
    let region = RegionSandbox::start_with_config("eu-west", &config).await;
    let operator = pki.write(&Identity::operator("admin").unwrap());
    pki.write(&Identity::operator("viewer").unwrap());
    let certs = operator.ca_path.parent().unwrap().display().to_string();
    let cli = Cli {
        args: vec![
            "--region".into(),
            format!("https://{}", region.addr()),
            "--region-name".into(),
            "eu-west".into(),
            "--certs".into(),
            certs,
        ],
    };
    let fails = |out: Output, says: &str| {
        assert!(!out.status.success(), "succeeded: {says}");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(stderr.contains(says), "{stderr}");
    };

    // Routes.
    let put = cli
        .json(&[
            "routes",
            "put",
            "assistant",
            "--weight",
            "sim-fast=3",
            "--weight",
            "sim-slow=1",
            "--fallback",
            "sim-slow",
        ])
        .await;
    assert_eq!(
        (
            &put["created"],
            &put["route"]["applied"],
            &put["route"]["source"]
        ),
        (&Value::Bool(true), &Value::Bool(true), &Value::from("api")),
        "{put}"
    );
    assert_eq!(put["route"]["weights"]["sim-fast"], 3, "{put}");
    let out = cli.run(&["routes", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("assistant  api     sim-fast=3 sim-slow=1  sim-slow   yes"),
        "{table}"
    );
    fails(
        cli.run(&["routes", "put", "bad", "--weight", "nope=1"])
            .await,
        "region eu-west cannot serve this route",
    );
    fails(
        cli.run(&["routes", "put", "bad", "--weight", "nope"]).await,
        "is not MODEL=WEIGHT",
    );
    let deleted = cli.json(&["routes", "delete", "assistant"]).await;
    assert_eq!(deleted["deleted"], true);
    assert_eq!(
        cli.json(&["routes", "list"]).await["data"],
        Value::Array(vec![])
    );

    // Region controls.
    let drained = cli
        .json(&["regions", "drain", "us-east", "--reason", "disk swap"])
        .await;
    assert_eq!(
        (&drained["drained"], &drained["reason"]),
        (&Value::Bool(true), &Value::from("disk swap"))
    );
    let weighed = cli.json(&["regions", "weight", "us-east", "40"]).await;
    assert_eq!(
        (&weighed["drained"], &weighed["weight"]),
        (&Value::Bool(true), &Value::from(40))
    );
    let undrained = cli.json(&["regions", "undrain", "us-east"]).await;
    assert_eq!(
        (
            &undrained["drained"],
            &undrained["weight"],
            &undrained["reason"]
        ),
        (&Value::Bool(false), &Value::from(40), &Value::from(""))
    );
    let out = cli.run(&["regions", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("us-east  serving  40"), "{table}");
    fails(
        cli.run(&["regions", "weight", "us-east", "140"]).await,
        "from 0 to 100",
    );

    // Prices and usage.
    let priced = cli
        .json(&[
            "prices", "put", "sim-fast", "--input", "1.5", "--output", "6",
        ])
        .await;
    assert_eq!(
        priced["data"][0],
        serde_json::json!({ "model": "sim-fast", "input_per_million": 1.5,
            "output_per_million": 6.0, "source": "api" })
    );
    assert_eq!(cli.json(&["prices", "list"]).await, priced);
    let usage = cli.json(&["usage", "--tenant", "acme"]).await;
    assert_eq!(
        (&usage["data"], &usage["truncated"]),
        (&Value::Array(vec![]), &Value::Bool(false))
    );
    fails(
        cli.run(&["usage", "--start", "2026-13-01"]).await,
        "`start` must be a date as YYYY-MM-DD",
    );

    // Operator tokens: made (shown once), listed, revoked.
    let made = cli
        .json(&["operator-tokens", "create", "terraform", "--role", "admin"])
        .await;
    let token = made["token"].as_str().unwrap();
    assert!(token.starts_with("mop-") && token.starts_with(made["prefix"].as_str().unwrap()));
    let id = made["id"].as_str().unwrap();
    let listed = cli.json(&["operator-tokens", "list"]).await;
    assert_eq!(listed["data"][0]["name"], "terraform", "{listed}");
    assert!(!listed.to_string().contains(token), "{listed}");
    let out = cli.run(&["operator-tokens", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("ID") && table.contains("terraform  admin"),
        "{table}"
    );
    let revoked = cli.json(&["operator-tokens", "revoke", id]).await;
    assert!(
        revoked["revoked_at"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{revoked}"
    );
    fails(
        cli.run(&["operator-tokens", "create", "ci", "--role", "root"])
            .await,
        "role \"root\" is not one of",
    );

    // A viewer reads all of it and changes none.
    let viewer = Cli {
        args: [cli.args.clone(), vec!["--operator".into(), "viewer".into()]].concat(),
    };
    viewer.json(&["operator-tokens", "list"]).await;
    fails(
        viewer.run(&["operator-tokens", "create", "ci"]).await,
        "may only read",
    );
    viewer.json(&["routes", "list"]).await;
    viewer.json(&["regions", "list"]).await;
    viewer.json(&["prices", "list"]).await;
    viewer.json(&["usage"]).await;
    fails(
        viewer.run(&["regions", "drain", "eu-west"]).await,
        "may only read",
    );
    let audit = cli.json(&["audit"]).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "operator_token.revoke",
            "operator_token.create",
            "price.set",
            "region.undrain",
            "region.update",
            "region.drain",
            "route.delete",
            "route.create"
        ]
    );
}
