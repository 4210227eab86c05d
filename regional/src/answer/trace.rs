//! What the pipeline says on the current request span (the one the API's
//! request layer opened), for traces that show which model served and how
//! the cache took part.

use meridian_mesh::trace::{self, KeyValue};

/// Names the model on the current request span: the one asked for and,
/// when an alias resolved to another, the one that serves.
pub(super) fn note_model(requested: &str, served: &str) {
    let cx = trace::Context::current();
    let mut attributes = vec![KeyValue::new("meridian.model", requested.to_string())];
    if served != requested {
        attributes.push(KeyValue::new("meridian.model.served", served.to_string()));
    }
    trace::set_attributes(&cx, attributes);
}

/// Says on the current request span how the response cache took part
/// (`hit_l1`, `hit_l2`, `hit_semantic`, `miss`, `bypass`).
pub(super) fn note_cache(outcome: &'static str) {
    trace::set_attributes(
        &trace::Context::current(),
        vec![KeyValue::new("meridian.cache", outcome)],
    );
}
