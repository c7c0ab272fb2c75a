//! Loading a model file: weights, tokenizer and chat template, checked against each other.

use crate::chat::{ChatTemplate, CHATML};
use crate::forward::Model;
use crate::gguf::{Gguf, GgufError};
use crate::model::{LlamaConfig, Weights};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("{0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Everything needed to serve a model.
pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
}

pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let g = Gguf::open(path)?;
    let config = LlamaConfig::from_gguf(&g)?;
    let weights = Weights::from_gguf(&g, &config)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    if tokenizer.vocab_size() != config.vocab {
        return Err(LoadError::Mismatch(format!(
            "tokenizer has {} tokens, the model {}",
            tokenizer.vocab_size(),
            config.vocab
        )));
    }
    let tok_text = |id: Option<u32>| id.map(|i| tokenizer.decode(&[i])).unwrap_or_default();
    let template = ChatTemplate::new(
        tokenizer.chat_template.as_deref().unwrap_or(CHATML),
        &tok_text(tokenizer.bos),
        &tok_text(Some(tokenizer.eos)),
    )
    .map_err(|e| LoadError::Template(e.to_string()))?;
    Ok(Loaded {
        model: Arc::new(Model::new(config, weights)),
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
    })
}
