//! SentencePiece GGUF vocabularies (`tokenizer.ggml.model = llama`) against
//! llama.cpp's own tokenizer test data: Llama 2's vocabulary, its test strings
//! and llama.cpp's ids for them (`tests/fixtures/llamacpp-vocab/`, see its README).

use std::path::{Path, PathBuf};

use arqon_runtime::engine;
use arqon_runtime::model::gguf::GgufFile;
use arqon_runtime::tokenizer::{IncrementalDecoder, Tokenizer};

const BOS: u32 = 1;
const EOS: u32 = 2;

fn vocab_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llamacpp-vocab/ggml-vocab-llama-spm.gguf")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf_file(&vocab_path()).expect("load the vocab-only GGUF")
}

/// The `.inp`/`.out` pairs, read as llama.cpp's `tests/test-tokenizer-0.cpp`
/// reads them: inputs are separated by "\n__ggml_vocab_test__\n" (the file
/// also ends with one, which starts no further input, so an input may be
/// empty or be only newlines); each `.out` line holds one input's ids, space
/// separated, with surrounding whitespace trimmed (an empty line: no ids).
fn cases() -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(vocab_path().with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(vocab_path().with_extension("gguf.out")).unwrap();
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.split_once(SEP) {
            Some((s, tail)) => {
                inputs.push(s.to_string());
                rest = tail;
            }
            None => {
                inputs.push(rest.to_string());
                rest = "";
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().expect("an id in the .out file")).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "the .inp and .out files disagree on the number of tests");
    inputs.into_iter().zip(outputs).collect()
}

#[test]
fn every_llamacpp_test_string_encodes_to_llamacpps_ids() {
    let tok = tokenizer();
    let cases = cases();
    // The fixture as copied from llama.cpp: 46 strings, among them the empty one.
    assert_eq!(cases.len(), 46);
    assert!(cases.iter().any(|(s, ids)| s.is_empty() && ids.is_empty()));
    let mut failed = Vec::new();
    for (text, want) in &cases {
        // llama.cpp's expected ids are without BOS (add_special = false).
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failed.push(format!("{text:?}\n  llama.cpp: {want:?}\n  ours:      {got:?}"));
        }
    }
    assert!(failed.is_empty(), "{} of {} strings differ:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

#[test]
fn decoding_what_was_encoded_gives_the_text_back() {
    let tok = tokenizer();
    let mut failed = Vec::new();
    for (text, ids) in cases() {
        // Decoded from the start: the space the encoder prefixed is dropped.
        let back = tok.decode(&ids, true).unwrap();
        if back != text {
            failed.push(format!("{text:?} decodes back to {back:?}"));
        }
        // As a continuation (after BOS, or streamed after a prompt) it stays.
        let continued = tok.decode_continuation(&ids, true).unwrap();
        if !ids.is_empty() && continued != format!(" {text}") {
            failed.push(format!("{text:?} continues as {continued:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn the_vocabulary_and_its_special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.bos(), Some(BOS));
    assert!(tok.stop_ids().contains(&EOS), "{:?}", tok.stop_ids());
    assert_eq!(tok.id_to_token(BOS).as_deref(), Some("<s>"));
    assert_eq!(tok.id_to_token(EOS).as_deref(), Some("</s>"));
    assert_eq!(tok.id_to_token(15043).as_deref(), Some("▁Hello"));
    assert_eq!(tok.id_to_token(13).as_deref(), Some("<0x0A>"));
    assert_eq!(tok.id_to_token(32000), None);
}

#[test]
fn add_special_prepends_bos_once() {
    let tok = tokenizer();
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![BOS, 15043, 3186]);
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15043, 3186]);
    assert_eq!(tok.encode("", true).unwrap(), vec![BOS]);
    // A prompt that already starts with BOS's text does not get a second one.
    assert_eq!(tok.encode("<s>Hello world", true).unwrap(), vec![BOS, 15043, 3186]);
    // llama.cpp's detokenizer keeps the space after a leading BOS.
    assert_eq!(tok.decode(&[BOS, 15043, 3186], true).unwrap(), " Hello world");
    assert_eq!(tok.decode(&[BOS, 15043, 3186], false).unwrap(), "<s> Hello world");
    assert_eq!(tok.decode(&[15043, 3186], true).unwrap(), "Hello world");
}

#[test]
fn special_token_texts_are_encoded_as_special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.encode("Hello world</s>", false).unwrap(), vec![15043, 3186, EOS]);
    // Text after a special token gets the space prefix again (llama.cpp's
    // rule), so "</s>Hello" is `</s>`, `▁Hello`.
    assert_eq!(tok.encode("</s>Hello", false).unwrap(), vec![EOS, 15043]);
    // A Llama 2 chat turn as its template renders it.
    let ids = tok.encode("<s>[INST] Hi [/INST] Hello</s>", false).unwrap();
    assert_eq!(ids.first(), Some(&BOS));
    assert_eq!(ids.last(), Some(&EOS));
    assert_eq!(ids.iter().filter(|&&i| i == BOS || i == EOS).count(), 2);
    assert_eq!(tok.decode(&ids, false).unwrap(), "<s> [INST] Hi [/INST] Hello</s>");
    assert_eq!(tok.decode(&ids, true).unwrap(), " [INST] Hi [/INST] Hello");
}

/// A generation streamed token by token after its prompt: byte tokens that
/// make up one emoji are held back until the character is complete, and the
/// first generated token keeps its leading space.
#[test]
fn streaming_decodes_byte_fallback_characters_whole() {
    let tok = tokenizer();
    let text = "The llama 🦙 says 😁, Cửa Việt!";
    let ids = tok.encode(text, false).unwrap();
    // The emoji and "ử" have no pieces: they are byte tokens (ids 3..=258).
    assert!(ids.iter().filter(|&&i| (3..=258).contains(&i)).count() >= 8, "{ids:?}");
    let prompt = tok.encode("The", false).unwrap();
    assert_eq!(ids[..prompt.len()], prompt[..]);
    let mut detok = IncrementalDecoder::new();
    let mut streamed = String::new();
    let mut held = 0;
    for &id in &ids[prompt.len()..] {
        let delta = detok.push(&tok, id).unwrap();
        assert!(!delta.contains('\u{FFFD}'), "a partial character was emitted: {delta:?}");
        held += delta.is_empty() as usize;
        streamed.push_str(&delta);
    }
    assert_eq!(streamed, &text["The".len()..]);
    assert!(held >= 5, "the byte tokens of the emoji should have been held back ({held})");

    // From the very first token (no prompt decoded before it), the stream
    // is still a continuation: its first token keeps the space.
    let mut detok = IncrementalDecoder::new();
    let streamed: String = ids.iter().map(|&id| detok.push(&tok, id).unwrap()).collect();
    assert_eq!(streamed, format!(" {text}"));
}

#[test]
fn a_vocab_only_file_is_no_model() {
    // Its header and vocabulary read fine ...
    let f = GgufFile::open(&vocab_path()).unwrap();
    let v = f.vocab().unwrap();
    assert_eq!(v.model, "llama");
    assert_eq!(v.scores.len(), v.tokens.len());
    assert!(v.add_space_prefix);
    assert_eq!(v.unk, Some(0));
    // ... but loading it as a model is an error, not a panic.
    let err = engine::load(&vocab_path()).expect_err("a vocab-only GGUF has no weights");
    let msg = err.to_string();
    assert!(msg.contains("missing"), "{msg}");
}
