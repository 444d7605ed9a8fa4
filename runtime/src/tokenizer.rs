//! Text ↔ token ids, from a Hugging Face `tokenizer.json` or rebuilt from a GGUF
//! file's own vocabulary, plus incremental detokenization for streaming.
//!
//! Two kinds sit behind one [`Tokenizer`]: a `tokenizers` pipeline (a
//! `tokenizer.json`, or a byte-level BPE GGUF, `tokenizer.ggml.model = gpt2`)
//! and llama.cpp's SentencePiece algorithm for `llama` GGUF vocabularies (the
//! `spm` submodule), so that a GGUF file is tokenized as llama.cpp does.
//!
//! Decoding from the start of a sequence ([`Tokenizer::decode`]) drops the space
//! a SentencePiece encoder prefixed; text that continues earlier text (a
//! generation after its prompt, one token's text in logprobs) keeps it
//! ([`Tokenizer::decode_continuation`], which [`IncrementalDecoder`] uses). A
//! generation's decoder also starts after the prompt's last tokens
//! ([`IncrementalDecoder::continuing`]), so a `tokenizer.json` decoder that
//! drops a leading space (Llama 2's `Metaspace`) keeps the first token's.

use std::path::Path;
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::gguf::{GgufFile, GgufVocab};

mod spm;

use spm::Spm;

/// Token texts that end generation in the chat and base models Arqon knows,
/// beyond the checkpoint's declared EOS (llama.cpp's "end of generation" set).
const END_OF_GENERATION: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|end|>"];

/// The Llama 3 pre-tokenizer regex (llama.cpp's `llama3` / `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer and its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    kind: Kind,
    bos: Option<u32>,
    add_bos: bool,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// The encoder and decoder behind a [`Tokenizer`].
#[derive(Clone)]
enum Kind {
    /// A `tokenizers` pipeline: `tokenizer.json`, or byte-level BPE rebuilt
    /// from a GGUF (shared, as both kinds are: neither changes once built).
    Hf(Arc<tokenizers::Tokenizer>),
    /// llama.cpp's SentencePiece over a GGUF vocabulary.
    Spm(Arc<Spm>),
}

impl Kind {
    fn token_to_id(&self, text: &str) -> Option<u32> {
        match self {
            Kind::Hf(t) => t.token_to_id(text),
            Kind::Spm(s) => s.token_to_id(text),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Hf(_) => "tokenizers",
            Kind::Spm(_) => "sentencepiece",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab", &self.vocab_size())
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
    /// Reads only the vocabulary of the GGUF file at `path` (so a vocab-only
    /// file, with no tensors, works) and rebuilds its tokenizer.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?.vocab()?)
    }

    /// Rebuilds the tokenizer a GGUF file describes: byte-level BPE (`gpt2`)
    /// or SentencePiece (`llama`) vocabularies.
    pub fn from_gguf(v: &GgufVocab) -> Result<Self> {
        match v.model.as_str() {
            "gpt2" => Self::from_gguf_bpe(v),
            "llama" => Self::from_gguf_spm(v),
            other => Err(Error::Tokenizer(format!(
                "GGUF tokenizer model {other:?} is not supported yet (byte-level BPE `gpt2` and \
                 SentencePiece `llama` are); use the checkpoint's Hugging Face folder with tokenizer.json instead"
            ))),
        }
    }

    /// A SentencePiece vocabulary, with llama.cpp's defaults for absent or
    /// out-of-range special ids (BOS 1, EOS 2).
    fn from_gguf_spm(v: &GgufVocab) -> Result<Self> {
        let spm = Spm::new(v)?;
        let n = spm.len();
        let special = |id: Option<u32>, default: u32, what: &str| -> Option<u32> {
            let valid = |i: &u32| (*i as usize) < n;
            if let Some(i) = id.filter(|i| !valid(i)) {
                tracing::warn!(id = i, vocab = n, "GGUF {what} id is outside the vocabulary; using the default");
            }
            id.filter(valid).or(Some(default).filter(valid))
        };
        let bos = special(v.bos, 1, "BOS");
        let eos = special(v.eos, 2, "EOS");
        let kind = Kind::Spm(Arc::new(spm));
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        Self::add_end_tokens(&kind, &mut stop_ids);
        Ok(Tokenizer { kind, bos, add_bos: v.add_bos, stop_ids, chat_template: v.chat_template.clone() })
    }

    /// A byte-level BPE vocabulary, as a `tokenizers` pipeline.
    fn from_gguf_bpe(v: &GgufVocab) -> Result<Self> {
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
        inner.add_special_tokens(special).map_err(tok_err)?;
        let kind = Kind::Hf(Arc::new(inner));
        let mut stop_ids: Vec<u32> = v.eos.into_iter().collect();
        Self::add_end_tokens(&kind, &mut stop_ids);
        Ok(Tokenizer { kind, bos: v.bos, add_bos: v.add_bos, stop_ids, chat_template: v.chat_template.clone() })
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
        let kind = Kind::Hf(Arc::new(inner));
        Self::add_end_tokens(&kind, &mut stop_ids);
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
        Ok(Tokenizer { kind, bos, add_bos: false, stop_ids, chat_template })
    }

    fn add_end_tokens(kind: &Kind, ids: &mut Vec<u32>) {
        for t in END_OF_GENERATION {
            if let Some(id) = kind.token_to_id(t) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
    }

    /// Encodes `text`; with `add_special`, adds BOS (and whatever the
    /// tokenizer's post-processor adds), unless `text` already starts with it.
    /// Special-token texts in `text` are matched as special tokens, as
    /// llama.cpp and transformers do for templates.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.kind {
            Kind::Hf(t) => t.encode_fast(text, add_special).map_err(tok_err)?.get_ids().to_vec(),
            Kind::Spm(s) => {
                let mut ids = Vec::new();
                s.encode(text, true, &mut ids)?;
                ids
            }
        };
        if add_special && self.add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids that start a sequence to text, dropping special tokens when
    /// `skip_special`. A SentencePiece vocabulary drops the first token's
    /// leading space, the one its encoder adds (llama.cpp's `detokenize`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.kind {
            Kind::Hf(t) => t.decode(ids, skip_special).map_err(tok_err),
            Kind::Spm(s) => Ok(s.decode(ids, !skip_special, true)),
        }
    }

    /// Decodes ids that continue earlier text (generated tokens after a
    /// prompt): as [`Tokenizer::decode`], but a SentencePiece vocabulary keeps
    /// the first token's leading space, so `▁world` after `Hello` is ` world`
    /// (llama.cpp's `token_to_piece`, which its server streams).
    pub fn decode_continuation(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.kind {
            Kind::Hf(t) => t.decode(ids, skip_special).map_err(tok_err),
            Kind::Spm(s) => Ok(s.decode(ids, !skip_special, false)),
        }
    }

    /// Ids that end generation (EOS and the end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The BOS id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The text of a token id, as the vocabulary stores it (`Ġworld`, `▁world`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.kind {
            Kind::Hf(t) => t.id_to_token(id),
            Kind::Spm(s) => s.id_to_token(id).map(String::from),
        }
    }

    /// The checkpoint's chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Hf(t) => t.get_vocab_size(true),
            Kind::Spm(s) => s.len(),
        }
    }
}

/// Turns a growing list of token ids into text deltas that are always valid
/// UTF-8 and never change once emitted (a multi-byte character split across
/// tokens, as SentencePiece byte tokens split an emoji, is held back until
/// complete), as TGI and vLLM stream. The ids continue a prompt, so they are
/// decoded with [`Tokenizer::decode_continuation`]: a generation's first
/// SentencePiece token keeps its leading space.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Whether the prompt context (if any) has been checked to end on a
    /// whole character.
    context_checked: bool,
}

/// Prompt tokens a [`IncrementalDecoder::continuing`] decoder keeps as
/// context (vLLM's incremental detokenizer uses the same five).
const CONTEXT_TOKENS: usize = 5;

impl IncrementalDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for text that continues `prompt`: its first deltas are
    /// decoded after the prompt's last few tokens, so a tokenizer whose
    /// decoder drops a sequence's leading space (a `tokenizer.json` with a
    /// SentencePiece-style `Metaspace` decoder, as Llama 2's) keeps the space
    /// of the first generated token: ` Paris` after `The capital is`, not
    /// `Paris`. Context that ends inside a multi-byte character is shortened
    /// (at the first [`IncrementalDecoder::push`]) until it does not.
    pub fn continuing(prompt: &[u32]) -> Self {
        let ctx = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDecoder {
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
            context_checked: ctx.is_empty(),
        }
    }

    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if !self.context_checked {
            self.context_checked = true;
            while self.read_offset > 0 && tok.decode_continuation(&self.ids, true)?.ends_with('\u{FFFD}') {
                self.ids.remove(0);
                self.read_offset -= 1;
            }
        }
        self.ids.push(id);
        let prefix = tok.decode_continuation(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode_continuation(&self.ids[self.prefix_offset..], true)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `tokenizer.json` whose decoder drops a sequence's leading space
    /// (`Metaspace`, as Llama 2's): `The capital is` then `Paris`.
    fn metaspace_tokenizer(dir: &Path) -> Tokenizer {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        let vocab = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris"];
        let vocab = vocab.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("<unk>".into()).build().unwrap();
        let mut t = tokenizers::Tokenizer::new(model);
        let ms = Metaspace::new('▁', PrependScheme::First, true);
        t.with_pre_tokenizer(Some(ms.clone()));
        t.with_decoder(Some(ms));
        t.save(dir.join("tokenizer.json"), false).unwrap();
        Tokenizer::from_hf_dir(dir, None, &[]).unwrap()
    }

    #[test]
    fn a_generation_keeps_its_first_leading_space_after_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let tok = metaspace_tokenizer(dir.path());
        let prompt = tok.encode("The capital is", false).unwrap();
        assert_eq!(prompt, [1, 2, 3]);
        // Decoded from the start of a sequence, the space goes.
        assert_eq!(tok.decode(&[4], true).unwrap(), "Paris");
        assert_eq!(IncrementalDecoder::new().push(&tok, 4).unwrap(), "Paris");
        // Continuing the prompt, it stays, and later tokens are unchanged.
        let mut d = IncrementalDecoder::continuing(&prompt);
        let text: String = [4, 2].iter().map(|id| d.push(&tok, *id).unwrap()).collect();
        assert_eq!(text, " Paris capital");
        // An empty prompt context behaves as a fresh decoder.
        assert_eq!(IncrementalDecoder::continuing(&[]).push(&tok, 4).unwrap(), "Paris");
    }
}
