//! Guards the public `meridian.v1` API: service, RPC and message names,
//! streaming flags, field numbers, and the rule that every element is
//! documented. A rename or renumbering in a proto file breaks these tests.

use std::collections::{BTreeMap, BTreeSet};

use meridian_proto::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};

const PACKAGE: &str = "meridian.v1";

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes")
}

fn meridian_files() -> Vec<FileDescriptorProto> {
    descriptor_set()
        .file
        .into_iter()
        .filter(|f| f.package() == PACKAGE)
        .collect()
}

/// (rpc name, input type, output type, client streaming, server streaming)
type Rpc = (&'static str, &'static str, &'static str, bool, bool);

/// The expected services: (file, service, rpcs in declaration order).
const SERVICES: &[(&str, &str, &[Rpc])] = &[
    (
        "meridian/v1/inference.proto",
        "Inference",
        &[
            (
                "Generate",
                "GenerateRequest",
                "GenerateResponse",
                false,
                false,
            ),
            (
                "GenerateStream",
                "GenerateRequest",
                "GenerateChunk",
                false,
                true,
            ),
            ("Embed", "EmbedRequest", "EmbedResponse", false, false),
            (
                "ListModels",
                "ListModelsRequest",
                "ListModelsResponse",
                false,
                false,
            ),
        ],
    ),
    (
        "meridian/v1/jobs.proto",
        "Jobs",
        &[
            ("Submit", "SubmitJobRequest", "Job", false, false),
            ("Get", "GetJobRequest", "Job", false, false),
            ("Watch", "WatchJobRequest", "JobEvent", false, true),
            ("Cancel", "CancelJobRequest", "Job", false, false),
        ],
    ),
    (
        "meridian/v1/telemetry.proto",
        "Telemetry",
        &[
            ("Ingest", "IngestRequest", "IngestResponse", true, false),
            ("Query", "QueryRequest", "QueryResponse", false, false),
        ],
    ),
    (
        "meridian/v1/admin.proto",
        "Admin",
        &[
            (
                "RegionStatus",
                "RegionStatusRequest",
                "RegionStatusResponse",
                false,
                false,
            ),
            ("Drain", "DrainRequest", "DrainResponse", false, false),
            (
                "PurgeCache",
                "PurgeCacheRequest",
                "PurgeCacheResponse",
                false,
                false,
            ),
            (
                "PutTenant",
                "PutTenantRequest",
                "PutTenantResponse",
                false,
                false,
            ),
            ("GetTenant", "GetTenantRequest", "Tenant", false, false),
            (
                "ListTenants",
                "ListTenantsRequest",
                "ListTenantsResponse",
                false,
                false,
            ),
            (
                "DeleteTenant",
                "DeleteTenantRequest",
                "Tenant",
                false,
                false,
            ),
            (
                "CreateApiKey",
                "CreateApiKeyRequest",
                "CreateApiKeyResponse",
                false,
                false,
            ),
            (
                "ListApiKeys",
                "ListApiKeysRequest",
                "ListApiKeysResponse",
                false,
                false,
            ),
            (
                "RevokeApiKey",
                "RevokeApiKeyRequest",
                "ApiKey",
                false,
                false,
            ),
            (
                "RotateApiKey",
                "RotateApiKeyRequest",
                "RotateApiKeyResponse",
                false,
                false,
            ),
            (
                "ListAudit",
                "ListAuditRequest",
                "ListAuditResponse",
                false,
                false,
            ),
            (
                "PutRoute",
                "PutRouteRequest",
                "PutRouteResponse",
                false,
                false,
            ),
            (
                "ListRoutes",
                "ListRoutesRequest",
                "ListRoutesResponse",
                false,
                false,
            ),
            (
                "DeleteRoute",
                "DeleteRouteRequest",
                "DeleteRouteResponse",
                false,
                false,
            ),
            (
                "ControlRegion",
                "ControlRegionRequest",
                "RegionControl",
                false,
                false,
            ),
            (
                "ListRegionControls",
                "ListRegionControlsRequest",
                "ListRegionControlsResponse",
                false,
                false,
            ),
            ("PutPrice", "PutPriceRequest", "ModelPrice", false, false),
            (
                "ListPrices",
                "ListPricesRequest",
                "ListPricesResponse",
                false,
                false,
            ),
            (
                "GetUsage",
                "GetUsageRequest",
                "GetUsageResponse",
                false,
                false,
            ),
            (
                "CreateOperatorToken",
                "CreateOperatorTokenRequest",
                "CreateOperatorTokenResponse",
                false,
                false,
            ),
            (
                "ListOperatorTokens",
                "ListOperatorTokensRequest",
                "ListOperatorTokensResponse",
                false,
                false,
            ),
            (
                "RevokeOperatorToken",
                "RevokeOperatorTokenRequest",
                "OperatorToken",
                false,
                false,
            ),
        ],
    ),
    (
        "meridian/v1/replication.proto",
        "Replication",
        &[
            ("Pull", "PullRequest", "ChangeBatch", false, true),
            ("Ack", "AckRequest", "AckResponse", false, false),
            ("Snapshot", "SnapshotRequest", "SnapshotChunk", false, true),
        ],
    ),
];

#[test]
fn package_has_the_six_files() {
    let names: BTreeSet<String> = meridian_files()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "meridian/v1/admin.proto",
        "meridian/v1/common.proto",
        "meridian/v1/inference.proto",
        "meridian/v1/jobs.proto",
        "meridian/v1/replication.proto",
        "meridian/v1/telemetry.proto",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
    for file in meridian_files() {
        assert_eq!(file.syntax(), "proto3", "{}", file.name());
    }
}

#[test]
fn services_and_rpcs_are_exactly_as_specified() {
    let files = meridian_files();
    let actual: BTreeSet<&str> = files
        .iter()
        .flat_map(|f| f.service.iter().map(|s| s.name()))
        .collect();
    let expected: BTreeSet<&str> = SERVICES.iter().map(|(_, name, _)| *name).collect();
    assert_eq!(actual, expected, "service names");

    for (file_name, service_name, rpcs) in SERVICES {
        let file = files
            .iter()
            .find(|f| f.name() == *file_name)
            .unwrap_or_else(|| panic!("{file_name} missing"));
        let service = file
            .service
            .iter()
            .find(|s| s.name() == *service_name)
            .unwrap_or_else(|| panic!("service {service_name} not in {file_name}"));
        let actual: Vec<(String, String, String, bool, bool)> = service
            .method
            .iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    m.input_type().to_owned(),
                    m.output_type().to_owned(),
                    m.client_streaming(),
                    m.server_streaming(),
                )
            })
            .collect();
        let expected: Vec<(String, String, String, bool, bool)> = rpcs
            .iter()
            .map(|(name, input, output, client, server)| {
                (
                    (*name).to_owned(),
                    format!(".{PACKAGE}.{input}"),
                    format!(".{PACKAGE}.{output}"),
                    *client,
                    *server,
                )
            })
            .collect();
        assert_eq!(actual, expected, "rpcs of {service_name}");
    }
}

#[test]
fn streaming_flags() {
    let files = meridian_files();
    let method = |service: &str, rpc: &str| {
        files
            .iter()
            .flat_map(|f| f.service.iter())
            .find(|s| s.name() == service)
            .and_then(|s| s.method.iter().find(|m| m.name() == rpc))
            .cloned()
            .unwrap_or_else(|| panic!("{service}.{rpc} missing"))
    };
    let generate_stream = method("Inference", "GenerateStream");
    assert!(generate_stream.server_streaming() && !generate_stream.client_streaming());
    let watch = method("Jobs", "Watch");
    assert!(watch.server_streaming() && !watch.client_streaming());
    let ingest = method("Telemetry", "Ingest");
    assert!(ingest.client_streaming() && !ingest.server_streaming());
    let pull = method("Replication", "Pull");
    assert!(pull.server_streaming() && !pull.client_streaming());
    let snapshot = method("Replication", "Snapshot");
    assert!(snapshot.server_streaming() && !snapshot.client_streaming());
}

/// Top-level messages by name across the package.
fn messages() -> BTreeMap<String, DescriptorProto> {
    meridian_files()
        .into_iter()
        .flat_map(|f| f.message_type)
        .map(|m| (m.name().to_owned(), m))
        .collect()
}

/// Field names of `message` in field-number order, with their numbers.
fn fields(messages: &BTreeMap<String, DescriptorProto>, message: &str) -> Vec<(String, i32)> {
    let mut fields: Vec<(String, i32)> = messages
        .get(message)
        .unwrap_or_else(|| panic!("message {message} missing"))
        .field
        .iter()
        .map(|f| (f.name().to_owned(), f.number()))
        .collect();
    fields.sort_by_key(|(_, number)| *number);
    fields
}

#[test]
fn specified_fields_keep_their_names_and_numbers() {
    // Each listed field must exist with number = position + 1. Messages may
    // gain fields after these, never change or lose these.
    let specified: &[(&str, &[&str])] = &[
        (
            "ErrorDetail",
            &["reason", "message", "retryable", "retry_after_ms", "region"],
        ),
        ("ChatMessage", &["role", "content", "name"]),
        (
            "GenerateRequest",
            &[
                "model",
                "messages",
                "max_tokens",
                "temperature",
                "top_p",
                "seed",
                "stop",
                "conversation_id",
                "user",
                "routing_hint",
                "no_cache",
            ],
        ),
        (
            "Usage",
            &["prompt_tokens", "completion_tokens", "total_tokens"],
        ),
        (
            "GenerateResponse",
            &[
                "id",
                "model",
                "message",
                "finish_reason",
                "usage",
                "region",
                "created_at",
                "time_to_first_token_ms",
                "latency_ms",
                "cache",
            ],
        ),
        (
            "GenerateChunk",
            &[
                "id",
                "model",
                "delta",
                "finish_reason",
                "usage",
                "index",
                "region",
            ],
        ),
        ("EmbedRequest", &["model", "inputs"]),
        ("Embedding", &["values", "index"]),
        ("EmbedResponse", &["model", "embeddings", "usage", "region"]),
        ("ListModelsRequest", &[]),
        (
            "Model",
            &["id", "owned_by", "kind", "context_window_tokens"],
        ),
        ("ListModelsResponse", &["models", "region"]),
        ("Reading", &["device_id", "ts", "metric", "value", "labels"]),
        ("Rejection", &["batch_index", "item_index", "reason"]),
        ("PeerLag", &["peer", "lag_events", "lag_ms"]),
        ("DrainRequest", &["drain"]),
        (
            "PullRequest",
            &["peer_region", "from_sequence", "max_batch"],
        ),
        (
            "Change",
            &[
                "sequence",
                "table",
                "key",
                "payload",
                "hlc",
                "origin_region",
                "committed_at",
                "op",
            ],
        ),
        (
            "ChangeBatch",
            &["changes", "high_watermark", "log_incarnation"],
        ),
        ("AckRequest", &["peer_region", "applied_sequence"]),
        ("SnapshotRequest", &["peer_region", "max_chunk"]),
        (
            "LogPosition",
            &["origin_region", "sequence", "log_incarnation"],
        ),
        ("SnapshotChunk", &["changes", "positions", "complete"]),
    ];
    let messages = messages();
    for (message, names) in specified {
        let actual = fields(&messages, message);
        for (i, name) in names.iter().enumerate() {
            let number = i32::try_from(i + 1).unwrap();
            assert!(
                actual.iter().any(|(n, num)| n == name && *num == number),
                "{message}.{name} = {number} missing; fields are {actual:?}"
            );
        }
    }
    // Messages given exactly (no extra fields) in the API spec.
    for exact in ["ErrorDetail", "ListModelsRequest", "PeerLag"] {
        let specified_len = specified.iter().find(|(m, _)| *m == exact).unwrap().1.len();
        assert_eq!(fields(&messages, exact).len(), specified_len, "{exact}");
    }
}

#[test]
fn enums_have_prefixed_values_and_unspecified_zero() {
    let expected: &[(&str, &[&str])] = &[
        (
            "FinishReason",
            &[
                "UNSPECIFIED",
                "STOP",
                "LENGTH",
                "TOOL_CALLS",
                "CONTENT_FILTER",
            ],
        ),
        (
            "CacheResult",
            &[
                "UNSPECIFIED",
                "MISS",
                "HIT_L1",
                "HIT_L2",
                "HIT_SEMANTIC",
                "BYPASS",
            ],
        ),
        (
            "ModelKind",
            &["UNSPECIFIED", "CHAT", "EMBEDDING", "ALIAS", "MODERATION"],
        ),
        (
            "JobState",
            &[
                "UNSPECIFIED",
                "QUEUED",
                "RUNNING",
                "SUCCEEDED",
                "FAILED",
                "DEAD_LETTERED",
                "CANCELLED",
            ],
        ),
        ("JobPriority", &["UNSPECIFIED", "INTERACTIVE", "BATCH"]),
        (
            "Aggregate",
            &["UNSPECIFIED", "AVG", "MIN", "MAX", "COUNT", "LAST"],
        ),
        (
            "RegionState",
            &["UNSPECIFIED", "SERVING", "DRAINING", "NOT_SERVING"],
        ),
        ("ChangeOp", &["UNSPECIFIED", "UPSERT", "DELETE", "APPEND"]),
    ];
    let files = meridian_files();
    let enums: BTreeMap<&str, _> = files
        .iter()
        .flat_map(|f| f.enum_type.iter())
        .map(|e| (e.name(), e))
        .collect();
    assert_eq!(
        enums.keys().copied().collect::<BTreeSet<_>>(),
        expected.iter().map(|(n, _)| *n).collect::<BTreeSet<_>>(),
        "enum names"
    );
    for (name, values) in expected {
        let prefix = screaming_snake(name);
        let actual: Vec<(String, i32)> = enums[name]
            .value
            .iter()
            .map(|v| (v.name().to_owned(), v.number()))
            .collect();
        let expected: Vec<(String, i32)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{prefix}_{v}"), i32::try_from(i).unwrap()))
            .collect();
        assert_eq!(actual, expected, "{name}");
    }
}

fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

// Field numbers of descriptor.proto used to build source-info paths.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn index(i: usize) -> i32 {
    i32::try_from(i).unwrap()
}

fn collect_message(
    message: &DescriptorProto,
    path: Vec<i32>,
    name: String,
    out: &mut Vec<(Vec<i32>, String)>,
) {
    // Synthesized map-entry messages cannot carry comments.
    if message.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    for (i, field) in message.field.iter().enumerate() {
        let mut p = path.clone();
        p.extend([MESSAGE_FIELD, index(i)]);
        out.push((p, format!("{name}.{}", field.name())));
    }
    for (i, nested) in message.nested_type.iter().enumerate() {
        let mut p = path.clone();
        p.extend([MESSAGE_NESTED_TYPE, index(i)]);
        collect_message(nested, p, format!("{name}.{}", nested.name()), out);
    }
    for (i, e) in message.enum_type.iter().enumerate() {
        let mut p = path.clone();
        p.extend([MESSAGE_ENUM_TYPE, index(i)]);
        let enum_name = format!("{name}.{}", e.name());
        for (j, v) in e.value.iter().enumerate() {
            let mut vp = p.clone();
            vp.extend([ENUM_VALUE, index(j)]);
            out.push((vp, format!("{enum_name}.{}", v.name())));
        }
        out.push((p, enum_name));
    }
    out.push((path, name));
}

#[test]
fn every_service_rpc_message_field_and_enum_value_is_documented() {
    let mut undocumented = Vec::new();
    for file in meridian_files() {
        let info = file
            .source_code_info
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no source info; build.rs must keep it", file.name()));
        let documented: BTreeSet<Vec<i32>> = info
            .location
            .iter()
            .filter(|l| {
                !l.leading_comments().trim().is_empty() || !l.trailing_comments().trim().is_empty()
            })
            .map(|l| l.path.clone())
            .collect();

        let mut elements = Vec::new();
        for (i, message) in file.message_type.iter().enumerate() {
            collect_message(
                message,
                vec![FILE_MESSAGE_TYPE, index(i)],
                message.name().to_owned(),
                &mut elements,
            );
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            for (j, v) in e.value.iter().enumerate() {
                elements.push((
                    vec![FILE_ENUM_TYPE, index(i), ENUM_VALUE, index(j)],
                    format!("{}.{}", e.name(), v.name()),
                ));
            }
            elements.push((vec![FILE_ENUM_TYPE, index(i)], e.name().to_owned()));
        }
        for (i, s) in file.service.iter().enumerate() {
            for (j, m) in s.method.iter().enumerate() {
                elements.push((
                    vec![FILE_SERVICE, index(i), SERVICE_METHOD, index(j)],
                    format!("{}.{}", s.name(), m.name()),
                ));
            }
            elements.push((vec![FILE_SERVICE, index(i)], s.name().to_owned()));
        }
        assert!(!elements.is_empty(), "{} declares nothing", file.name());
        for (path, name) in elements {
            if !documented.contains(&path) {
                undocumented.push(format!("{}: {name}", file.name()));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "undocumented elements:\n{}",
        undocumented.join("\n")
    );
}

#[test]
fn generated_types_are_usable() {
    // Compile-time check that the generated Rust names the other crates use
    // exist, and that enum values convert from their proto names.
    use meridian_proto::v1;
    let _ = v1::inference_client::InferenceClient::<tonic::transport::Channel>::new;
    fn _servers<I, J, T, A, R>()
    where
        I: v1::inference_server::Inference,
        J: v1::jobs_server::Jobs,
        T: v1::telemetry_server::Telemetry,
        A: v1::admin_server::Admin,
        R: v1::replication_server::Replication,
    {
    }
    assert_eq!(
        v1::FinishReason::from_str_name("FINISH_REASON_STOP"),
        Some(v1::FinishReason::Stop)
    );
    assert_eq!(
        v1::JobState::DeadLettered.as_str_name(),
        "JOB_STATE_DEAD_LETTERED"
    );
    let request = v1::GenerateRequest {
        model: "m".into(),
        max_tokens: Some(16),
        ..Default::default()
    };
    let bytes = request.encode_to_vec();
    assert_eq!(
        v1::GenerateRequest::decode(bytes.as_slice()).unwrap(),
        request
    );
}
