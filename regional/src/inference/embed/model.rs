//! all-MiniLM-L6-v2 on candle: BERT, mean pooling over the attention mask,
//! L2 normalisation, as sentence-transformers' `modules.json` for the model
//! prescribes. Everything here blocks; it runs on the embedder's own thread.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig, DTYPE};
use tokenizers::Tokenizer;

use crate::error::Error;

const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The loaded model and its tokenizer.
pub(super) struct MiniLm {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
}

fn model_error(what: &str, dir: &Path, e: impl std::fmt::Display) -> Error {
    Error::EmbeddingModel(format!("{what} in {}: {e}", dir.display()))
}

/// The absolute `dir`, or which of the model's files it lacks. Absolute in
/// messages: the operator may not know the node's working directory.
pub(super) fn check_files(dir: &Path) -> Result<PathBuf, Error> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| PathBuf::from(dir));
    let missing: Vec<_> = FILES
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    Err(Error::EmbeddingModelMissing {
        missing: missing.join(", "),
        dir,
    })
}

impl MiniLm {
    /// Reads the three files from `dir`; a missing one is named in the
    /// error, which tells how to get them.
    pub(super) fn load(dir: &Path) -> Result<Self, Error> {
        let dir = check_files(dir)?;
        let config: BertConfig = serde_json::from_slice(&std::fs::read(dir.join(FILES[0]))?)
            .map_err(|e| model_error("bad config.json", &dir, e))?;
        let mut tokenizer = Tokenizer::from_file(dir.join(FILES[1]))
            .map_err(|e| model_error("bad tokenizer.json", &dir, e))?;
        // The file pads and truncates to 128; the node counts every token
        // itself and refuses overlong texts, and pads per batch.
        tokenizer
            .with_truncation(None)
            .map_err(|e| model_error("tokenizer", &dir, e))?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        // Buffered rather than memory-mapped: mapping is `unsafe` in candle,
        // and 90 MB read once at start is cheap.
        let weights = std::fs::read(dir.join(FILES[2]))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DTYPE, &device)
            .map_err(|e| model_error("bad model.safetensors", &dir, e))?;
        let bert = BertModel::load(vb, &config)
            .map_err(|e| model_error("model.safetensors does not fit config.json", &dir, e))?;
        Ok(Self {
            bert,
            tokenizer,
            device,
            dimensions: config.hidden_size,
        })
    }

    pub(super) fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Token ids of `text` with `[CLS]` and `[SEP]`.
    pub(super) fn tokenize(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::EmbeddingModel(format!("tokenizer: {e}")))
    }

    /// Unit vectors for token sequences, in their order. Sequences are
    /// padded to the longest, so callers group them by length.
    pub(super) fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, Error> {
        self.forward(seqs)
            .map_err(|e| Error::EmbeddingModel(format!("forward pass: {e}")))
    }

    fn forward(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = seqs.len();
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        // Padding id and mask 0 past each sequence's end.
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (i, seq) in seqs.iter().enumerate() {
            ids[i * len..i * len + seq.len()].copy_from_slice(seq);
            mask[i * len..i * len + seq.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &token_types, Some(&mask))?;
        // Mean over the real tokens only: padding must not move the vector,
        // or a text's embedding would depend on its batch neighbours.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let mean = summed.broadcast_div(&mask.sum(1)?)?;
        // torch.nn.functional.normalize: x / max(‖x‖, 1e-12).
        let norm = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}
