//! Text ↔ token ids, from a Hugging Face `tokenizer.json` or rebuilt from a GGUF
//! file's own vocabulary, plus incremental detokenization for streaming.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::gguf::GgufVocab;

/// Token texts that end generation in the chat and base models Arqon knows,
/// beyond the checkpoint's declared EOS (llama.cpp's "end of generation" set).
const END_OF_GENERATION: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|end|>"];

/// The Llama 3 pre-tokenizer regex (llama.cpp's `llama3` / `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer and its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Rebuilds the tokenizer a GGUF file describes (byte-level BPE vocabularies).
    pub fn from_gguf(v: &GgufVocab) -> Result<Self> {
        if v.model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model {:?} is not supported yet (byte-level BPE `gpt2` is); \
                 use the checkpoint's Hugging Face folder with tokenizer.json instead",
                v.model
            )));
        }
        let vocab: tokenizers::models::bpe::Vocab =
            v.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> =
            v.merges.iter().filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string()))).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match v.pre.as_deref() {
            // SmolLM: every digit on its own, then GPT-2's split.
            Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            Some("llama3") | Some("llama-bpe") | Some("llama-v3") => {
                let split =
                    Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                        .map_err(tok_err)?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            Some("gpt2") | Some("default") | None => byte_level.into(),
            Some(other) => {
                tracing::warn!(pre = other, "unknown GGUF pre-tokenizer; using GPT-2's, tokenization may differ");
                byte_level.into()
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let special: Vec<AddedToken> = v
            .tokens
            .iter()
            .zip(&v.token_types)
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&special);
        let mut stop_ids: Vec<u32> = v.eos.into_iter().collect();
        Self::add_end_tokens(&inner, &mut stop_ids);
        Ok(Tokenizer { inner, bos: v.bos, add_bos: v.add_bos, stop_ids, chat_template: v.chat_template.clone() })
    }

    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`
    /// (chat template, BOS handling). `eos_ids` come from `config.json`.
    pub fn from_hf_dir(dir: &Path, bos: Option<u32>, eos_ids: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::load(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| Error::load(&cfg_path, format!("invalid JSON: {e}")))?
            }
            Err(_) => serde_json::Value::Null,
        };
        let token_text = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content").and_then(|c| c.as_str()).map(String::from),
            }
        };
        let bos = bos.or_else(|| token_text("bos_token").and_then(|t| inner.token_to_id(&t)));
        let mut stop_ids = eos_ids.to_vec();
        if let Some(id) = token_text("eos_token").and_then(|t| inner.token_to_id(&t)) {
            stop_ids.push(id);
        }
        Self::add_end_tokens(&inner, &mut stop_ids);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        // tokenizer.json's post-processor adds BOS itself where the model wants it.
        Ok(Tokenizer { inner, bos, add_bos: false, stop_ids, chat_template })
    }

    fn add_end_tokens(inner: &tokenizers::Tokenizer, ids: &mut Vec<u32>) {
        for t in END_OF_GENERATION {
            if let Some(id) = inner.token_to_id(t) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
    }

    /// Encodes `text`; with `add_special`, adds BOS (and whatever the
    /// tokenizer's post-processor adds). Special-token texts in `text` are
    /// matched as special tokens, as llama.cpp and transformers do for templates.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Ids that end generation (EOS and the end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The BOS id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The checkpoint's chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text deltas that are always valid
/// UTF-8 and never change once emitted (a multi-byte character split across
/// tokens is held back until complete), as TGI and vLLM stream.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}
