//! llama.cpp's SentencePiece tokenizer (`tokenizer.ggml.model = llama`: Llama 1
//! and 2, TinyLlama, Mistral v0.1, ...) over a GGUF file's vocabulary.
//!
//! Encoding, as `llm_tokenizer_spm` in llama.cpp's `src/llama-vocab.cpp`:
//! special-token texts are cut out of the text first (longest first); each
//! remaining stretch of text gets a leading space if `add_space_prefix` and it
//! starts the text or follows a special token; spaces become U+2581 (`▁`); the
//! stretch is split into characters, and the adjacent pair whose concatenation
//! is a vocabulary piece with the highest score is merged, again and again
//! (ties: the leftmost pair); a final symbol that is not a piece is emitted as
//! its bytes' `<0xNN>` tokens. Decoding turns `▁` back into spaces, byte
//! tokens into raw bytes, and drops the space the prefix added.
//!
//! Why a port and not a `tokenizers` BPE with merges derived from the scores
//! (transformers' `LlamaConverter`): the GGUF carries scores, not merges, and
//! a derived merge list ranks the different pairs that form one piece ("ab"+"c",
//! "a"+"bc") apart, where SentencePiece gives them the piece's one score and
//! takes the leftmost; and llama.cpp's space prefix after every special token
//! is its own rule, not a `Metaspace` option. The port is short and gives
//! llama.cpp's ids by construction (tested on llama.cpp's own test strings in
//! `tests/tokenizer_spm.rs`).
//!
//! Invariant: every id this module emits is below [`Spm::len`].

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};
use crate::model::gguf::GgufVocab;

/// SentencePiece's escaped space.
const SPACE: char = '\u{2581}';

/// What a vocabulary entry is (`tokenizer.ggml.token_type`), as llama.cpp reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// Text (type 1); `▁` stands for a space.
    Normal,
    /// `<unk>` (type 2): printed only when special tokens are.
    Unknown,
    /// `<s>`, `</s>`, ... (type 3): printed only when special tokens are.
    Control,
    /// Added text (type 4): matched whole before merging, always printed verbatim.
    UserDefined,
    /// Type 5: never printed.
    Unused,
    /// `<0xNN>` (type 6): one raw byte.
    Byte(u8),
    /// Any other type: never printed, as llama.cpp treats it.
    Undefined,
}

impl PieceKind {
    fn new(ty: i32, text: &str) -> Self {
        match ty {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            // A byte-typed token that is not spelled `<0xNN>` (llama.cpp would
            // misread it) is kept as text rather than refusing the vocabulary.
            6 => parse_byte(text).map_or(PieceKind::Normal, PieceKind::Byte),
            _ => PieceKind::Undefined,
        }
    }

    /// Whether the encoder cuts this piece's text out of the input whole.
    fn is_special(self) -> bool {
        matches!(self, PieceKind::Control | PieceKind::UserDefined | PieceKind::Unknown)
    }
}

/// `<0xNN>` → NN.
fn parse_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceKind,
}

/// A SentencePiece vocabulary, ready to encode and decode.
#[derive(Clone)]
pub(crate) struct Spm {
    pieces: Vec<Piece>,
    /// Piece text → id; where two ids share a text the later wins, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// The `<0xNN>` token of each byte, looked up by text as llama.cpp does.
    byte_ids: [Option<u32>; 256],
    /// Used for a byte the vocabulary has no token for (llama.cpp aborts there).
    unk: Option<u32>,
    /// Control, user-defined and unknown pieces, longest text first.
    specials: Vec<u32>,
    add_space_prefix: bool,
}

/// A stretch of the input: text still to encode, or a special token cut out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// A run of the escaped text, `len` bytes from `start`, in a linked list of
/// the current symbols; `len == 0` once merged into its left neighbour.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and `right` (whose texts were `size`
/// bytes together when it was queued) into a piece of score `score`.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    /// The highest score first; among equal scores the leftmost (llama.cpp's
    /// `llm_bigram_spm::comparator`). Scores are never NaN (see [`Spm::new`]).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// Builds the tokenizer from a GGUF vocabulary (missing scores count as
    /// 0, missing types as normal, as in llama.cpp).
    pub(crate) fn new(v: &GgufVocab) -> Result<Self> {
        if v.tokens.is_empty() {
            return Err(Error::Tokenizer("the SentencePiece vocabulary is empty".into()));
        }
        if v.tokens.len() > u32::MAX as usize {
            return Err(Error::Tokenizer(format!("{} tokens do not fit 32-bit ids", v.tokens.len())));
        }
        let pieces: Vec<Piece> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // llama.cpp renames empty pieces so that none matches everywhere.
                let text = if t.is_empty() { format!("[EMPTY_{i}]") } else { t.clone() };
                // C++ compares scores with `<`: -0.0 ties with 0.0 (so it is
                // made 0.0 for `total_cmp`), and a NaN would break the queue's
                // order (so it is never preferred).
                let score = v.scores.get(i).copied().unwrap_or(0.0);
                let score = if score.is_nan() {
                    f32::NEG_INFINITY
                } else if score == 0.0 {
                    0.0
                } else {
                    score
                };
                let kind = PieceKind::new(v.token_types.get(i).copied().unwrap_or(1), &text);
                Piece { text, score, kind }
            })
            .collect();
        let ids: HashMap<String, u32> = pieces.iter().enumerate().map(|(i, p)| (p.text.clone(), i as u32)).collect();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            // llama.cpp's `byte_to_token`: `<0xNN>`, else the byte itself as a piece.
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                let c = char::from_u32(b as u32).filter(char::is_ascii)?;
                ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied()
            });
        }
        let mut specials: Vec<u32> =
            (0..pieces.len() as u32).filter(|&i| pieces[i as usize].kind.is_special()).collect();
        // llama.cpp sorts with the unstable std::sort; ties only matter for two
        // equally long special texts that overlap in the input.
        specials.sort_by_key(|&i| std::cmp::Reverse(pieces[i as usize].text.len()));
        let unk = v.unk.or(Some(0)).filter(|&u| (u as usize) < pieces.len());
        Ok(Spm { pieces, ids, byte_ids, unk, specials, add_space_prefix: v.add_space_prefix })
    }

    /// The number of pieces.
    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a piece's text.
    pub(crate) fn token_to_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// A piece's text as stored (`▁Hello`, `<0x0A>`, `</s>`).
    pub(crate) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// Appends the ids of `text` to `out` (no BOS). With `parse_special`,
    /// control and unknown texts (`<s>`, `</s>`, `<unk>`) in `text` become their
    /// tokens; user-defined pieces always do (llama.cpp's `parse_special`).
    pub(crate) fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<()> {
        // The start of the text counts as following a special token.
        let mut after_special = true;
        let mut escaped = String::new();
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(s) => {
                    escaped.clear();
                    if self.add_space_prefix && after_special {
                        escaped.push(SPACE);
                    }
                    escaped.extend(s.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.encode_escaped(&escaped, out)?;
                    after_special = false;
                }
            }
        }
        Ok(())
    }

    /// Cuts the special pieces out of `text`, longest first, each at every
    /// (non-overlapping, leftmost-first) occurrence in what is still text
    /// (llama.cpp's `tokenizer_st_partition`; the LSTRIP/RSTRIP attributes it
    /// sets for a few non-Llama models by name are not applied).
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = if text.is_empty() { Vec::new() } else { vec![Fragment::Text(text)] };
        for &id in &self.specials {
            let piece = &self.pieces[id as usize];
            if !parse_special && piece.kind != PieceKind::UserDefined {
                continue;
            }
            let pat = piece.text.as_str();
            if !fragments.iter().any(|f| matches!(f, Fragment::Text(s) if s.contains(pat))) {
                continue;
            }
            let mut split = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    split.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(pat) {
                    if at > 0 {
                        split.push(Fragment::Text(&rest[..at]));
                    }
                    split.push(Fragment::Token(id));
                    rest = &rest[at + pat.len()..];
                }
                if !rest.is_empty() {
                    split.push(Fragment::Text(rest));
                }
            }
            fragments = split;
        }
        fragments
    }

    /// Encodes one stretch of escaped text by SentencePiece's merge loop
    /// (llama.cpp's `llm_tokenizer_spm_session::tokenize`).
    fn encode_escaped(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> =
            text.char_indices().map(|(start, c)| Symbol { start, len: c.len_utf8(), prev: None, next: None }).collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = Some(i + 1).filter(|&j| j < n);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..n {
            self.queue_bigram(text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (left, right) = (symbols[b.left], symbols[b.right]);
            // Skip a pair one of whose symbols has changed since it was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != b.size {
                continue;
            }
            symbols[b.left].len += right.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].prev = Some(b.left);
            }
            if let Some(prev) = left.prev {
                self.queue_bigram(text, &symbols, prev, b.left, &mut queue);
            }
            if let Some(next) = right.next {
                self.queue_bigram(text, &symbols, b.left, next, &mut queue);
            }
        }
        // Every merged symbol is a piece by construction, so only a single
        // character can be missing from the vocabulary: llama.cpp's
        // `resegment` then finds nothing in its merge map and emits bytes.
        let mut at = if n > 0 { Some(0) } else { None };
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.byte_token(b)?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    /// Queues the merge of `left` and `right` if their texts together form a piece.
    fn queue_bigram(&self, text: &str, symbols: &[Symbol], left: usize, right: usize, queue: &mut BinaryHeap<Bigram>) {
        let start = symbols[left].start;
        let size = symbols[left].len + symbols[right].len;
        if let Some(&id) = self.ids.get(&text[start..start + size]) {
            queue.push(Bigram { score: self.pieces[id as usize].score, left, right, size });
        }
    }

    fn byte_token(&self, b: u8) -> Result<u32> {
        self.byte_ids[b as usize].or(self.unk).ok_or_else(|| {
            Error::Tokenizer(format!("the vocabulary has no token <0x{b:02X}> for byte fallback and no unknown token"))
        })
    }

    /// The text of `ids` (llama.cpp's `detokenize` without `remove_special`):
    /// control and unknown pieces only when `special`; a raw byte sequence that
    /// is not valid UTF-8 (a character cut short) becomes U+FFFD. With
    /// `strip_leading_space` and the space prefix on, the first token's leading
    /// space (the one the encoder added) is dropped; a sequence that starts
    /// with BOS keeps it, as in llama.cpp.
    pub(crate) fn decode(&self, ids: &[u32], special: bool, strip_leading_space: bool) -> String {
        let mut bytes = Vec::new();
        let mut strip = strip_leading_space && self.add_space_prefix;
        for &id in ids {
            let start = bytes.len();
            // An id outside the vocabulary prints nothing, as in llama.cpp.
            if let Some(p) = self.pieces.get(id as usize) {
                match p.kind {
                    PieceKind::Control | PieceKind::Unknown if special => bytes.extend_from_slice(p.text.as_bytes()),
                    PieceKind::UserDefined => bytes.extend_from_slice(p.text.as_bytes()),
                    PieceKind::Normal => {
                        for (i, part) in p.text.split(SPACE).enumerate() {
                            if i > 0 {
                                bytes.push(b' ');
                            }
                            bytes.extend_from_slice(part.as_bytes());
                        }
                    }
                    PieceKind::Byte(b) => bytes.push(b),
                    PieceKind::Control | PieceKind::Unknown | PieceKind::Unused | PieceKind::Undefined => {}
                }
            }
            if strip && bytes.get(start) == Some(&b' ') {
                bytes.remove(start);
            }
            strip = false;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made vocabulary: bytes for `\n` and the 4 bytes of 🦙, specials,
    /// and pieces whose scores make the merge order observable.
    fn vocab(add_space_prefix: bool) -> Spm {
        let entries: &[(&str, f32, i32)] = &[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x0A>", 0.0, 6),
            ("<0xF0>", 0.0, 6),
            ("<0x9F>", 0.0, 6),
            ("<0xA6>", 0.0, 6),
            ("<0x99>", 0.0, 6),
            ("▁", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -2.0, 1),
            ("c", -2.0, 1),
            ("ab", -5.0, 1),
            ("bc", -4.0, 1),
            ("abc", -3.0, 1),
            ("▁a", -6.0, 1),
            ("<tool>", 0.0, 4),
            ("unused", 0.0, 5),
            ("aa", -7.0, 1),
        ];
        let v = GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens: entries.iter().map(|e| e.0.to_string()).collect(),
            merges: Vec::new(),
            scores: entries.iter().map(|e| e.1).collect(),
            token_types: entries.iter().map(|e| e.2).collect(),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: true,
            add_space_prefix,
            chat_template: None,
        };
        Spm::new(&v).unwrap()
    }

    fn ids(s: &Spm, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        s.encode(text, parse_special, &mut out).unwrap();
        out
    }

    #[test]
    fn the_best_scoring_pair_merges_first() {
        let s = vocab(false);
        // "bc" (-4) beats "ab" (-5); then "a"+"bc" forms "abc" (-3).
        assert_eq!(ids(&s, "abc", true), vec![14]);
        // "ab" alone: no better pair exists.
        assert_eq!(ids(&s, "ab", true), vec![12]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let s = vocab(false);
        // In "aaa" both "aa" pairs tie: the left one merges, then "aa"+"a" is no piece.
        assert_eq!(ids(&s, "aaa", true), vec![18, 9]);
    }

    #[test]
    fn space_prefix_and_escaping() {
        let s = vocab(true);
        // " a" → "▁▁a": "▁a" merges (the only pair), leaving "▁" first.
        assert_eq!(ids(&s, " a", true), vec![8, 15]);
        assert_eq!(ids(&s, "", true), Vec::<u32>::new());
        assert_eq!(vocab(false).decode(&[15], false, true), " a");
        assert_eq!(s.decode(&[15], false, true), "a");
        assert_eq!(s.decode(&[15], false, false), " a");
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let s = vocab(false);
        assert_eq!(ids(&s, "\n🦙", true), vec![3, 4, 5, 6, 7]);
        assert_eq!(s.decode(&[3, 4, 5, 6, 7], false, true), "\n🦙");
        // A character cut short decodes to U+FFFD, not to an error.
        assert_eq!(s.decode(&[4, 5], false, true), "\u{FFFD}");
        // 'x' has no piece and no byte token: the unknown token stands in.
        assert_eq!(ids(&s, "x", true), vec![0]);
    }

    #[test]
    fn special_texts_are_cut_out_and_followed_by_a_space_prefix() {
        let s = vocab(true);
        assert_eq!(ids(&s, "a</s>a", true), vec![15, 2, 15]);
        // Not parsed: plain text, whose characters here have neither pieces
        // nor byte tokens, so each becomes <unk>.
        assert_eq!(ids(&s, "</s>", false), vec![8, 0, 0, 0, 0]);
        // User-defined pieces are cut out even without parse_special.
        assert_eq!(ids(&s, "<tool>a", false), vec![16, 15]);
        assert_eq!(ids(&s, "a<tool>", false), vec![15, 16]);
        assert_eq!(s.decode(&[1, 15, 2], true, true), "<s> a</s>");
        assert_eq!(s.decode(&[1, 15, 2, 17], false, true), " a");
    }

    #[test]
    fn parse_byte_reads_only_the_byte_spelling() {
        assert_eq!(parse_byte("<0x0A>"), Some(10));
        assert_eq!(parse_byte("<0xff>"), Some(255));
        assert_eq!(parse_byte("<0x1>"), None);
        assert_eq!(parse_byte("0x0A"), None);
    }
}
