//! A cached answer, and how the cache took part in answering a request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::inference::{
    Assembly, Chunk, ChunkStream, Completion, Delta, Extras, Fallback, Finish, Usage,
};

/// A cached answer: what replaying a completion needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Tool calls, refusal, log probabilities and the upstream's own fields;
    /// absent from entries written before answers carried them.
    #[serde(default)]
    pub extras: Extras,
    /// Set when a fallback model wrote the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

impl Answer {
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// The answer as a stream of word-sized deltas, then its tool calls and
    /// refusal whole, so a streaming client reads a hit the way it reads a
    /// generation. Log probabilities ride on the first piece, whole.
    pub(crate) fn stream(self: Arc<Self>) -> ChunkStream {
        let mut pieces: Vec<Delta> = self.text.split_inclusive(' ').map(Delta::text).collect();
        pieces.extend(self.extras.deltas());
        if let Some(lp) = &self.extras.logprobs {
            match pieces.first_mut() {
                Some(first) => first.logprobs = Some(lp.clone()),
                None => pieces.push(Delta {
                    logprobs: Some(lp.clone()),
                    ..Delta::default()
                }),
            }
        }
        let done = Chunk::Done {
            finish: self.finish,
            usage: self.usage(),
            meta: self.extras.meta.clone(),
        };
        let chunks = pieces.into_iter().map(Chunk::Delta).chain([done]).map(Ok);
        Box::pin(futures::stream::iter(chunks))
    }

    /// The answer of a whole completion.
    pub(crate) fn of(done: Completion) -> Self {
        Self {
            text: done.text,
            finish: done.finish,
            prompt_tokens: done.usage.prompt_tokens,
            completion_tokens: done.usage.completion_tokens,
            extras: done.extras,
            fallback: done.fallback,
        }
    }

    /// The answer a stream assembled, with how it ended.
    pub(crate) fn assembled(
        assembly: Assembly,
        finish: Finish,
        usage: Usage,
        meta: crate::inference::Meta,
    ) -> Self {
        let (text, extras) = assembly.finish(meta);
        Self {
            text,
            finish,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            extras,
            fallback: None,
        }
    }
}

/// How the cache took part in answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    HitL1,
    HitL2,
    HitSemantic,
    Miss,
    Bypass,
}

impl Outcome {
    /// The metric label and the usage table's `cache` value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HitL1 => "hit_l1",
            Self::HitL2 => "hit_l2",
            Self::HitSemantic => "hit_semantic",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    /// The `x-meridian-cache` response header value.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Self::HitL1 => "hit-l1",
            Self::HitL2 => "hit-l2",
            Self::HitSemantic => "hit-semantic",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    pub(crate) fn proto(self) -> meridian_proto::v1::CacheResult {
        use meridian_proto::v1::CacheResult;
        match self {
            Self::HitL1 => CacheResult::HitL1,
            Self::HitL2 => CacheResult::HitL2,
            Self::HitSemantic => CacheResult::HitSemantic,
            Self::Miss => CacheResult::Miss,
            Self::Bypass => CacheResult::Bypass,
        }
    }

    pub(crate) fn is_hit(self) -> bool {
        matches!(self, Self::HitL1 | Self::HitL2 | Self::HitSemantic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hits_stream_back_the_whole_answer() {
        use futures::StreamExt;
        let answer = Arc::new(Answer {
            text: "one two three".into(),
            finish: Finish::Length,
            prompt_tokens: 4,
            completion_tokens: 3,
            extras: Extras::default(),
            fallback: None,
        });
        let chunks: Vec<_> = answer.stream().map(|c| c.unwrap()).collect().await;
        let text: String = chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::Delta(d) => Some(d.content.as_str()),
                Chunk::Done { .. } => None,
            })
            .collect();
        assert_eq!(text, "one two three");
        assert_eq!(chunks.len(), 4);
        assert!(
            matches!(&chunks[3], Chunk::Done { finish: Finish::Length, usage, .. } if usage.completion_tokens == 3)
        );
    }

    #[tokio::test]
    async fn a_hit_streams_back_its_tool_calls_and_fields() {
        use crate::inference::{FunctionCall, Meta, ToolCall};
        use futures::StreamExt;
        let mut meta = Meta::default();
        meta.fields
            .insert("system_fingerprint".into(), "fp_test".into());
        let answer = Answer {
            text: String::new(),
            finish: Finish::ToolCalls,
            prompt_tokens: 9,
            completion_tokens: 5,
            extras: Extras {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: "get_weather".into(),
                        arguments: "{\"city\":\"Oslo\"}".into(),
                    },
                }],
                meta,
                ..Extras::default()
            },
            fallback: None,
        };
        // Through Redis's encoding and back, as an L2 hit is.
        let answer: Answer = serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
        let chunks: Vec<_> = Arc::new(answer.clone())
            .stream()
            .map(|c| c.unwrap())
            .collect()
            .await;
        let mut assembly = Assembly::default();
        let mut end = None;
        for c in chunks {
            match c {
                Chunk::Delta(d) => assembly.push(&d),
                Chunk::Done {
                    finish,
                    usage,
                    meta,
                } => end = Some((finish, usage, meta)),
            }
        }
        let (finish, usage, meta) = end.unwrap();
        let again = Answer::assembled(assembly, finish, usage, meta);
        assert_eq!(again.extras, answer.extras);
        assert_eq!(again.finish, Finish::ToolCalls);
    }
}
