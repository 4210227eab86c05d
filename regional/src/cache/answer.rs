//! A cached answer, and how the cache took part in answering a request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::inference::{Chunk, ChunkStream, Finish, Usage};

/// A cached answer: what replaying a completion needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Answer {
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// The answer as a stream of word-sized deltas, so a streaming client
    /// reads a hit the way it reads a generation.
    pub(crate) fn stream(self: Arc<Self>) -> ChunkStream {
        let pieces: Vec<_> = self
            .text
            .split_inclusive(' ')
            .map(|p| Ok(Chunk::Delta(p.to_string())))
            .collect();
        let done = Ok(Chunk::Done {
            finish: self.finish,
            usage: self.usage(),
        });
        Box::pin(futures::stream::iter(pieces.into_iter().chain([done])))
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
        });
        let chunks: Vec<_> = answer.stream().map(|c| c.unwrap()).collect().await;
        let text: String = chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::Delta(d) => Some(d.as_str()),
                Chunk::Done { .. } => None,
            })
            .collect();
        assert_eq!(text, "one two three");
        assert_eq!(chunks.len(), 4);
        assert!(
            matches!(chunks[3], Chunk::Done { finish: Finish::Length, usage } if usage.completion_tokens == 3)
        );
    }
}
