//! A streamed answer as the Responses event protocol: `response.created`,
//! `response.in_progress`, then per output item `output_item.added`, its
//! content parts and deltas (`output_text.delta`, `refusal.delta`,
//! `function_call_arguments.delta`), their `.done` events and
//! `output_item.done`, and last `response.completed` (or `incomplete`, or
//! `failed`). Every event carries its `sequence_number`, from 0, which the
//! SDKs' stream parsers rely on to assemble the response.

use axum::response::sse::Event;
use serde_json::{Map, Value, json};

use super::object::{Shell, State, chat_logprobs, text_part};
use super::request::item_id;
use crate::error::Error;
use crate::inference::{Delta, Finish, Meta, Usage};

/// Turns a stream's pieces into events, keeping the output assembled so
/// far for the last event and the stored response.
pub(super) struct Writer {
    shell: Shell,
    logprobs: bool,
    sequence: u64,
    /// Finished output items.
    output: Vec<Value>,
    open: Option<Open>,
}

/// The output item being streamed.
enum Open {
    Message {
        id: String,
        parts: Vec<Value>,
        part: Option<Part>,
    },
    Call {
        id: String,
        /// The call's index in chat's `delta.tool_calls`.
        index: u32,
        call_id: String,
        name: String,
        arguments: String,
    },
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Kind {
    Text,
    Refusal,
}

struct Part {
    kind: Kind,
    text: String,
    logprobs: Vec<Value>,
}

impl Writer {
    pub(super) fn new(shell: Shell, logprobs: bool) -> Self {
        Self {
            shell,
            logprobs,
            sequence: 0,
            output: Vec::new(),
            open: None,
        }
    }

    pub(super) fn shell(&self) -> &Shell {
        &self.shell
    }

    fn event(&mut self, kind: &'static str, fields: Value) -> Event {
        let mut data = Map::new();
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(self.sequence));
        if let Value::Object(fields) = fields {
            data.extend(fields);
        }
        self.sequence += 1;
        Event::default()
            .event(kind)
            .json_data(Value::Object(data))
            .expect("events serialize")
    }

    /// `response.created` and `response.in_progress`.
    pub(super) fn start(&mut self) -> Vec<Event> {
        let object = self.shell.object(State::in_progress());
        vec![
            self.event("response.created", json!({"response": object})),
            self.event("response.in_progress", json!({"response": object})),
        ]
    }

    /// The events of one piece of the answer.
    pub(super) fn delta(&mut self, d: &Delta) -> Vec<Event> {
        let mut events = Vec::new();
        if !d.content.is_empty() {
            let logprobs = chat_logprobs(d.logprobs.as_ref(), self.logprobs);
            self.part(Kind::Text, &mut events);
            let (item_id, output_index, content_index) = self.position();
            if let Some(Open::Message {
                part: Some(part), ..
            }) = &mut self.open
            {
                part.text.push_str(&d.content);
                part.logprobs.extend(logprobs.iter().cloned());
            }
            events.push(self.event(
                "response.output_text.delta",
                json!({
                    "item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "delta": d.content, "logprobs": logprobs,
                }),
            ));
        }
        if let Some(refusal) = &d.refusal {
            self.part(Kind::Refusal, &mut events);
            let (item_id, output_index, content_index) = self.position();
            if let Some(Open::Message {
                part: Some(part), ..
            }) = &mut self.open
            {
                part.text.push_str(refusal);
            }
            events.push(self.event(
                "response.refusal.delta",
                json!({
                    "item_id": item_id, "output_index": output_index,
                    "content_index": content_index, "delta": refusal,
                }),
            ));
        }
        for f in &d.tool_calls {
            let same = matches!(&self.open, Some(Open::Call { index, .. }) if *index == f.index);
            let name = f.function.as_ref().and_then(|f| f.name.clone());
            if !same {
                self.close(&mut events);
                let id = item_id("fc");
                let call_id = f.id.clone().unwrap_or_default();
                let name = name.clone().unwrap_or_default();
                let item = json!({
                    "id": id, "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": "",
                });
                let output_index = self.output.len();
                events.push(self.event(
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": item}),
                ));
                self.open = Some(Open::Call {
                    id,
                    index: f.index,
                    call_id,
                    name,
                    arguments: String::new(),
                });
            } else if let (Some(more), Some(Open::Call { name, .. })) = (&name, &mut self.open) {
                name.push_str(more);
            }
            let piece = f
                .function
                .as_ref()
                .and_then(|f| f.arguments.as_deref())
                .unwrap_or("");
            if !piece.is_empty() {
                let output_index = self.output.len();
                let Some(Open::Call { id, arguments, .. }) = &mut self.open else {
                    continue;
                };
                arguments.push_str(piece);
                let id = id.clone();
                events.push(self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": output_index, "delta": piece}),
                ));
            }
        }
        events
    }

    /// The end of the answer: the open item closed, and the final object
    /// the last event carries (sent once the response is stored).
    pub(super) fn finish(
        &mut self,
        finish: Finish,
        usage: Usage,
        meta: &Meta,
    ) -> (Vec<Event>, Value) {
        let mut events = Vec::new();
        if self.output.is_empty() && self.open.is_none() {
            // A model that said nothing still answers with a message, as the
            // whole (not streamed) answer does.
            self.part(Kind::Text, &mut events);
        }
        self.close_with(finish, &mut events);
        let object = self
            .shell
            .object(State::finished(&self.output, finish, usage, meta));
        (events, object)
    }

    /// The last event: `response.completed` or `response.incomplete`.
    pub(super) fn last(&mut self, object: Value) -> Event {
        let kind = if object["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.event(kind, json!({"response": object}))
    }

    /// A failure after the stream began: `response.failed` with what was
    /// produced, and the object to store.
    pub(super) fn fail(&mut self, e: &Error) -> (Event, Value) {
        let mut events = Vec::new();
        self.close(&mut events);
        let object = self.shell.object(State::failed(&self.output, e));
        (
            self.event("response.failed", json!({"response": object.clone()})),
            object,
        )
    }

    /// The open message's id, its output index and its part's index.
    fn position(&self) -> (String, usize, usize) {
        match &self.open {
            Some(Open::Message { id, parts, .. }) => (id.clone(), self.output.len(), parts.len()),
            _ => (String::new(), self.output.len(), 0),
        }
    }

    /// Makes the open item a message whose current part is of `kind`.
    fn part(&mut self, kind: Kind, events: &mut Vec<Event>) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(events);
            let id = item_id("msg");
            let item = json!({
                "id": id, "type": "message", "status": "in_progress",
                "role": "assistant", "content": [],
            });
            let output_index = self.output.len();
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            ));
            self.open = Some(Open::Message {
                id,
                parts: Vec::new(),
                part: None,
            });
        }
        let current = match &self.open {
            Some(Open::Message { part, .. }) => part.as_ref().map(|p| p.kind),
            _ => None,
        };
        if current == Some(kind) {
            return;
        }
        self.close_part(events);
        let (item_id, output_index, content_index) = self.position();
        let part = match kind {
            Kind::Text => text_part("", Vec::new()),
            Kind::Refusal => json!({"type": "refusal", "refusal": ""}),
        };
        events.push(self.event(
            "response.content_part.added",
            json!({
                "item_id": item_id, "output_index": output_index,
                "content_index": content_index, "part": part,
            }),
        ));
        if let Some(Open::Message { part, .. }) = &mut self.open {
            *part = Some(Part {
                kind,
                text: String::new(),
                logprobs: Vec::new(),
            });
        }
    }

    /// Ends the open message's current part: its `.done` events.
    fn close_part(&mut self, events: &mut Vec<Event>) {
        let (item_id, output_index, content_index) = self.position();
        let Some(Open::Message { part, .. }) = &mut self.open else {
            return;
        };
        let Some(done) = part.take() else {
            return;
        };
        let whole = match done.kind {
            Kind::Text => {
                events.push(self.event(
                    "response.output_text.done",
                    json!({
                        "item_id": item_id, "output_index": output_index,
                        "content_index": content_index, "text": done.text,
                        "logprobs": done.logprobs,
                    }),
                ));
                text_part(&done.text, done.logprobs)
            }
            Kind::Refusal => {
                events.push(self.event(
                    "response.refusal.done",
                    json!({
                        "item_id": item_id, "output_index": output_index,
                        "content_index": content_index, "refusal": done.text,
                    }),
                ));
                json!({"type": "refusal", "refusal": done.text})
            }
        };
        events.push(self.event(
            "response.content_part.done",
            json!({
                "item_id": item_id, "output_index": output_index,
                "content_index": content_index, "part": whole,
            }),
        ));
        if let Some(Open::Message { parts, .. }) = &mut self.open {
            parts.push(whole);
        }
    }

    fn close(&mut self, events: &mut Vec<Event>) {
        self.close_with(Finish::Stop, events);
    }

    /// Ends the open item: its last events, and it joins the output.
    fn close_with(&mut self, finish: Finish, events: &mut Vec<Event>) {
        self.close_part(events);
        let output_index = self.output.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message { id, parts, .. }) => {
                let status = if finish == Finish::Length {
                    "incomplete"
                } else {
                    "completed"
                };
                json!({
                    "id": id, "type": "message", "status": status,
                    "role": "assistant", "content": parts,
                })
            }
            Some(Open::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            }) => {
                events.push(self.event(
                    "response.function_call_arguments.done",
                    json!({
                        "item_id": id, "output_index": output_index,
                        "name": name, "arguments": arguments,
                    }),
                ));
                json!({
                    "id": id, "type": "function_call", "status": "completed",
                    "call_id": call_id, "name": name, "arguments": arguments,
                })
            }
        };
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": output_index, "item": item}),
        ));
        self.output.push(item);
    }
}
