//! JSON strategies: any value, and OpenAI-shaped bodies whose fields are
//! each either plausible or anything at all, so cases reach the checks past
//! the parser as well as the parser itself.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Strings that parsers and stores trip on, beside random ones.
pub(crate) fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z ]{0,16}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => Just("\u{0}".to_string()),
        1 => Just("\u{feff}é𝄞\u{202e}".to_string()),
        1 => Just("'; DROP TABLE jobs; --".to_string()),
        1 => (1usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

/// Numbers at the edges of every integer type a field may be read into.
pub(crate) fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => (-4i64..64).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => prop::sample::select(vec![
            json!(0), json!(-1), json!(u32::MAX), json!(u64::from(u32::MAX) + 1),
            json!(i32::MAX), json!(i64::MAX), json!(u64::MAX), json!(i64::MIN),
            json!(1.5), json!(-0.0), json!(1e300), json!(2.000_001),
        ]),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep.
pub(crate) fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "model",
            "messages",
            "role",
            "content",
            "max_tokens",
            "prompt",
            "input",
            "stream",
            "type",
            "text",
            "device_id",
            "metric",
            "value",
            "ts",
            "labels",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,10}",
    ]
    .boxed()
}

/// `Some(value)` from `plausible` mostly, anything sometimes, or absent.
pub(crate) fn field(plausible: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        6 => plausible.prop_map(Some),
        1 => any_json().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// A field of a clean body: `plausible`, or absent when `optional`.
fn clean(plausible: BoxedStrategy<Value>, optional: bool) -> BoxedStrategy<Option<Value>> {
    if optional {
        prop::option::weighted(0.5, plausible).boxed()
    } else {
        plausible.prop_map(Some).boxed()
    }
}

/// A required field, clean or messy.
fn req(p: BoxedStrategy<Value>, messy: bool) -> BoxedStrategy<Option<Value>> {
    if messy { field(p) } else { clean(p, false) }
}

/// An optional field, clean or messy.
fn opt(p: BoxedStrategy<Value>, messy: bool) -> BoxedStrategy<Option<Value>> {
    if messy { field(p) } else { clean(p, true) }
}

/// An object of the given optional fields, plus sometimes an unknown one.
/// (Clean objects get no unknown field: some endpoints refuse those.)
pub(crate) fn object(
    fields: Vec<(&'static str, BoxedStrategy<Option<Value>>)>,
    messy: bool,
) -> BoxedStrategy<Value> {
    let (names, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    let extra = if messy {
        prop::option::of((key(), any_json())).boxed()
    } else {
        Just(None).boxed()
    };
    (values, extra)
        .prop_map(move |(values, extra)| {
            let mut map = Map::new();
            if let Some((k, v)) = extra {
                map.insert(k, v);
            }
            for (name, value) in names.iter().zip(values) {
                if let Some(v) = value {
                    map.insert((*name).to_string(), v);
                }
            }
            Value::Object(map)
        })
        .boxed()
}

fn model(served: &'static str) -> BoxedStrategy<Value> {
    prop_oneof![
        6 => Just(json!(served)),
        1 => Just(json!("")),
        1 => "[a-z-]{1,12}".prop_map(Value::String),
    ]
    .boxed()
}

/// A valid `max_tokens`: small (the answer is generated), or at the edges
/// of the context window and of u32.
fn valid_tokens() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (1i64..24).prop_map(Value::from),
        1 => prop::sample::select(vec![8191i64, 8192, 8193, i64::from(i32::MAX), i64::from(u32::MAX)])
            .prop_map(Value::from),
    ]
    .boxed()
}

fn small_tokens() -> BoxedStrategy<Value> {
    prop_oneof![4 => (1i64..24).prop_map(Value::from), 1 => number()].boxed()
}

fn message(messy: bool) -> BoxedStrategy<Value> {
    let role = prop_oneof![
        6 => prop::sample::select(vec!["system", "developer", "user", "assistant", "tool"])
            .prop_map(Value::from),
        1 => text().prop_map(Value::String),
    ]
    .boxed();
    let part = object(
        vec![
            (
                "type",
                field(
                    prop::sample::select(vec!["text", "image_url"])
                        .prop_map(Value::from)
                        .boxed(),
                ),
            ),
            ("text", field(text().prop_map(Value::String).boxed())),
        ],
        true,
    );
    let content = prop_oneof![
        4 => text().prop_map(Value::String),
        1 => prop::collection::vec(part, 0..3).prop_map(Value::Array),
        1 => Just(Value::Null),
    ]
    .boxed();
    if !messy {
        let role = prop::sample::select(vec!["system", "user", "assistant"])
            .prop_map(Value::from)
            .boxed();
        let content = "[a-zA-Z ,.]{1,60}".prop_map(Value::String).boxed();
        return object(
            vec![
                ("role", clean(role, false)),
                ("content", clean(content, false)),
            ],
            false,
        );
    }
    object(
        vec![("role", field(role)), ("content", field(content))],
        true,
    )
}

fn stop() -> BoxedStrategy<Value> {
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(text().prop_map(Value::String), 0..4).prop_map(Value::Array),
    ]
    .boxed()
}

fn temperature() -> BoxedStrategy<Value> {
    prop_oneof![3 => (0.0f64..2.0).prop_map(Value::from), 1 => number()].boxed()
}

/// A `/v1/chat/completions` body: mostly valid ones (which reach the model),
/// else with any field of any shape.
pub(crate) fn chat_body(served: &'static str) -> BoxedStrategy<Value> {
    prop_oneof![2 => chat_body_with(served, false), 1 => chat_body_with(served, true)].boxed()
}

/// `model` and `max_tokens` of a body: the served model and a valid
/// budget, or (messy) any shape of either.
fn model_and_max_tokens(
    served: &'static str,
    messy: bool,
) -> (BoxedStrategy<Value>, BoxedStrategy<Value>) {
    if messy {
        (model(served), small_tokens())
    } else {
        (Just(json!(served)).boxed(), valid_tokens())
    }
}

fn chat_body_with(served: &'static str, messy: bool) -> BoxedStrategy<Value> {
    let (model, max_tokens) = model_and_max_tokens(served, messy);
    object(
        vec![
            ("model", req(model, messy)),
            (
                "messages",
                req(
                    prop::collection::vec(message(messy), 1..4)
                        .prop_map(Value::Array)
                        .boxed(),
                    messy,
                ),
            ),
            ("max_tokens", opt(max_tokens.clone(), messy)),
            (
                "max_completion_tokens",
                prop_oneof![3 => Just(None), 1 => opt(max_tokens, messy)].boxed(),
            ),
            (
                "seed",
                opt(
                    if messy {
                        number()
                    } else {
                        any::<u32>().prop_map(Value::from).boxed()
                    },
                    messy,
                ),
            ),
            ("stop", opt(stop(), messy)),
            (
                "stream",
                opt(any::<bool>().prop_map(Value::Bool).boxed(), messy),
            ),
            (
                "stream_options",
                opt(
                    any::<bool>()
                        .prop_map(|b| json!({"include_usage": b}))
                        .boxed(),
                    messy,
                ),
            ),
            (
                "n",
                opt(
                    if messy {
                        prop_oneof![3 => Just(json!(1)), 1 => number()].boxed()
                    } else {
                        Just(json!(1)).boxed()
                    },
                    messy,
                ),
            ),
            (
                "temperature",
                opt(
                    if messy {
                        temperature()
                    } else {
                        (0.0f64..2.0).prop_map(Value::from).boxed()
                    },
                    messy,
                ),
            ),
            (
                "tools",
                prop_oneof![3 => Just(None), 1 => field(any_json())].boxed(),
            ),
        ],
        messy,
    )
}

/// A `/v1/completions` body.
pub(crate) fn completion_body(served: &'static str) -> BoxedStrategy<Value> {
    prop_oneof![2 => completion_body_with(served, false), 1 => completion_body_with(served, true)]
        .boxed()
}

fn completion_body_with(served: &'static str, messy: bool) -> BoxedStrategy<Value> {
    let prompt = prop_oneof![
        3 => "[a-z ]{1,40}".prop_map(Value::String),
        1 => prop::collection::vec(text().prop_map(Value::String), 0..3).prop_map(Value::Array),
    ]
    .boxed();
    let (model, max_tokens) = model_and_max_tokens(served, messy);
    object(
        vec![
            ("model", req(model, messy)),
            ("prompt", req(prompt, messy)),
            ("max_tokens", opt(max_tokens, messy)),
            ("seed", opt(number(), messy)),
            ("stop", opt(stop(), messy)),
            (
                "stream",
                opt(any::<bool>().prop_map(Value::Bool).boxed(), messy),
            ),
            ("temperature", opt(temperature(), messy)),
        ],
        messy,
    )
}

/// A `/v1/embeddings` body: a few short inputs, the model being CPU-bound.
pub(crate) fn embeddings_body(served: &'static str) -> BoxedStrategy<Value> {
    let short = "[a-z ]{1,24}".prop_map(Value::String).boxed();
    let input = prop_oneof![
        3 => short.clone(),
        2 => prop::collection::vec(short, 1..4).prop_map(Value::Array),
        1 => prop::collection::vec((0i64..30_000).prop_map(Value::from), 0..4).prop_map(Value::Array),
    ]
    .boxed();
    let format = prop::sample::select(vec!["float", "base64", "int8"])
        .prop_map(Value::from)
        .boxed();
    any::<bool>()
        .prop_flat_map(move |messy| {
            let model = if messy {
                model(served)
            } else {
                Just(json!(served)).boxed()
            };
            object(
                vec![
                    ("model", req(model, messy)),
                    ("input", req(input.clone(), messy)),
                    ("encoding_format", opt(format.clone(), messy)),
                    (
                        "dimensions",
                        prop_oneof![3 => Just(None), 1 => field(number())].boxed(),
                    ),
                ],
                messy,
            )
        })
        .boxed()
}

/// One telemetry reading as the HTTP ingest takes it.
pub(crate) fn reading() -> BoxedStrategy<Value> {
    let ts = prop_oneof![
        3 => Just(json!(chrono::Utc::now().to_rfc3339())),
        1 => text().prop_map(Value::String),
        1 => number(),
        1 => Just(json!("1970-01-01T00:00:00Z")),
        1 => Just(json!("9999-12-31T23:59:59Z")),
    ]
    .boxed();
    let labels = prop::collection::btree_map("[a-z]{1,6}", text(), 0..3)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect()))
        .boxed();
    object(vec![
        ("device_id", field(prop_oneof![3 => "[a-z0-9-]{1,12}".prop_map(Value::String), 1 => text().prop_map(Value::String)].boxed())),
        ("metric", field(prop_oneof![3 => "[a-z_]{1,12}".prop_map(Value::String), 1 => text().prop_map(Value::String)].boxed())),
        ("value", field(prop_oneof![3 => (-1e6f64..1e6).prop_map(Value::from), 1 => number()].boxed())),
        ("ts", field(ts)),
        ("labels", field(labels)),
    ], true)
}
