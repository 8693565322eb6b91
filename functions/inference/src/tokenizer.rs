//! CLIP's byte-level BPE tokenizer, built exactly as transformers 5 builds `CLIPTokenizer`
//! (`transformers/models/clip/tokenization_clip.py`) on the Hugging Face `tokenizers` library —
//! the same Rust library (with the same Oniguruma regex engine) the Python package wraps, so ids
//! match by construction: NFC, whitespace runs → one space, lowercase; CLIP's split regex; byte
//! mapping; BPE with the `</w>` end-of-word suffix; `<|startoftext|>` … `<|endoftext|>`; truncation
//! to `model_max_length` (77) and right padding with the pad token.
//!
//! SDXL's two tokenizers share the vocabulary (OpenAI's CLIP BPE, 49 408 ids) and differ in the pad
//! token: `tokenizer/` pads with `<|endoftext|>` (49407), `tokenizer_2/` with `!` (0). Because
//! transformers registers the pad token as a special token, tokenizer 2 also splits every `!` of a
//! prompt off as id 0 (`"wow!!"` → `wow</w>`, 0, 0, where tokenizer 1 gives `wow</w>`, `!!</w>`);
//! that is how diffusers tokenizes SDXL prompts, and it is reproduced here.
//!
//! Model folders carry `vocab.json` + `merges.txt` (+ `tokenizer_config.json`,
//! `special_tokens_map.json`): [`ClipTokenizer::from_folder`]. Single-file checkpoints carry no
//! tokenizer: [`ClipTokenizer::bundled_sdxl_tokenizer`] and
//! [`ClipTokenizer::bundled_sdxl_tokenizer_2`] use the merges bundled in this crate
//! (`assets/clip_merges.txt.gz`, 208 kB: the first 48 894 lines after the header of OpenAI CLIP's
//! MIT-licensed `bpe_simple_vocab_16e6.txt.gz`, regenerate with
//! `zcat bpe_simple_vocab_16e6.txt.gz | sed -n 2,48895p | gzip -9n`), from which the vocabulary
//! follows as OpenAI's `SimpleTokenizer` derives it, and the special-token setup of SDXL's folders.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde_json::Value;
use tch::{Device, Tensor};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{EngineError, Result};

/// The text length CLIP text encoders take (their `max_position_embeddings`), BOS and EOS included.
pub const MAX_LENGTH: usize = 77;

/// CLIP's beginning-of-text token.
pub const START_OF_TEXT: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also its unknown token, and tokenizer 1's pad token).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The pad token of SDXL's second tokenizer (`tokenizer_2/`, OpenCLIP's convention), id 0.
pub const SDXL_TOKENIZER_2_PAD: &str = "!";

/// The split regex of transformers' `CLIPTokenizer` (OpenAI's `SimpleTokenizer` pattern).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// BPE merges in rank order.
type Merges = Vec<(String, String)>;

static BUNDLED_MERGES: &[u8] = include_bytes!("../assets/clip_merges.txt.gz");

/// One prompt as a text encoder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// `max_length` ids: BOS, at most `max_length − 2` text ids, EOS, then pad ids.
    pub ids: Vec<i64>,
    /// How many text ids truncation dropped (diffusers warns when this is not 0).
    pub truncated: usize,
}

impl TokenizedPrompt {
    /// The ids as a `[1, max_length]` int64 tensor on `device`.
    pub fn to_tensor(&self, device: Device) -> Tensor {
        Tensor::from_slice(&self.ids).unsqueeze(0).to_device(device)
    }
}

/// An added token as `tokenizer_config.json`'s `added_tokens_decoder` describes it.
#[derive(Debug, Clone)]
struct AddedTokenSpec {
    content: String,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl AddedTokenSpec {
    /// How transformers adds a special token the config does not list: not normalized.
    fn special(content: &str) -> Self {
        AddedTokenSpec {
            content: content.to_owned(),
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }
}

/// The special-token setup of a tokenizer folder.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    /// `added_tokens_decoder`, ordered by id.
    added: Vec<AddedTokenSpec>,
    model_max_length: usize,
}

impl SpecialTokens {
    /// The setup of SDXL's `tokenizer/` (pad = `<|endoftext|>`) or `tokenizer_2/` (pad = `!`),
    /// as their `tokenizer_config.json` files have it.
    fn sdxl(pad: &str) -> Self {
        let mut added = Vec::new();
        if pad == SDXL_TOKENIZER_2_PAD {
            added.push(AddedTokenSpec::special(SDXL_TOKENIZER_2_PAD));
        }
        added.push(AddedTokenSpec {
            normalized: true,
            ..AddedTokenSpec::special(START_OF_TEXT)
        });
        added.push(AddedTokenSpec::special(END_OF_TEXT));
        SpecialTokens {
            bos: START_OF_TEXT.to_owned(),
            eos: END_OF_TEXT.to_owned(),
            unk: END_OF_TEXT.to_owned(),
            pad: pad.to_owned(),
            added,
            model_max_length: MAX_LENGTH,
        }
    }
}

/// A CLIP tokenizer producing the fixed-length id rows SDXL's text encoders take.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Reads a tokenizer folder of a diffusers model (`tokenizer/` or `tokenizer_2/`):
    /// `vocab.json` and `merges.txt`, and — when present — `tokenizer_config.json` (added tokens,
    /// special tokens, `model_max_length`) and `special_tokens_map.json` (special tokens the config
    /// does not name), with the precedence transformers 5 gives them. Without a
    /// `model_max_length` the length is [`MAX_LENGTH`].
    ///
    /// A folder with only `tokenizer.json` (what transformers 5's `save_pretrained` writes) is
    /// read for its BPE vocabulary and merges instead.
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let (vocab, merges) =
            if folder.join("vocab.json").is_file() || !folder.join("tokenizer.json").is_file() {
                let vocab: HashMap<String, u32> =
                    serde_json::from_str(&read_text(&folder.join("vocab.json"))?).map_err(|e| {
                        invalid(format!("{}: {e}", folder.join("vocab.json").display()))
                    })?;
                (
                    vocab,
                    parse_merges(&read_text(&folder.join("merges.txt"))?)?,
                )
            } else {
                vocabulary_from_tokenizer_json(&folder.join("tokenizer.json"))?
            };
        let config = read_optional_json(&folder.join("tokenizer_config.json"))?;
        let map = read_optional_json(&folder.join("special_tokens_map.json"))?;
        let special = |key: &str, default: &str| {
            [&config, &map]
                .into_iter()
                .flatten()
                .find_map(|json| token_content(json.get(key)?))
                .unwrap_or_else(|| default.to_owned())
        };
        let mut added: Vec<(u64, AddedTokenSpec)> = Vec::new();
        if let Some(decoder) = config
            .as_ref()
            .and_then(|c| c.get("added_tokens_decoder"))
            .and_then(Value::as_object)
        {
            for (id, token) in decoder {
                let id = id
                    .parse()
                    .map_err(|_| invalid(format!("added token id {id:?} is not a number")))?;
                let content = token_content(token)
                    .ok_or_else(|| invalid(format!("added token {id} has no content")))?;
                let flag = |name: &str| token.get(name).and_then(Value::as_bool).unwrap_or(false);
                added.push((
                    id,
                    AddedTokenSpec {
                        content,
                        normalized: flag("normalized"),
                        lstrip: flag("lstrip"),
                        rstrip: flag("rstrip"),
                        single_word: flag("single_word"),
                    },
                ));
            }
        }
        added.sort_by_key(|(id, _)| *id);
        let model_max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(MAX_LENGTH);
        let specials = SpecialTokens {
            bos: special("bos_token", START_OF_TEXT),
            eos: special("eos_token", END_OF_TEXT),
            unk: special("unk_token", END_OF_TEXT),
            pad: special("pad_token", END_OF_TEXT),
            added: added.into_iter().map(|(_, token)| token).collect(),
            model_max_length,
        };
        Self::build(vocab, merges, specials)
    }

    /// How many token ids this tokenizer can produce (its text encoder's `vocab_size` must cover
    /// them).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// SDXL's first tokenizer (`tokenizer/`: pads with `<|endoftext|>`) on the bundled vocabulary,
    /// for checkpoints without tokenizer folders.
    pub fn bundled_sdxl_tokenizer() -> Result<Self> {
        let (vocab, merges) = bundled_vocabulary()?;
        Self::build(vocab, merges, SpecialTokens::sdxl(END_OF_TEXT))
    }

    /// SDXL's second tokenizer (`tokenizer_2/`: pads with `!`, id 0) on the bundled vocabulary,
    /// for checkpoints without tokenizer folders.
    pub fn bundled_sdxl_tokenizer_2() -> Result<Self> {
        let (vocab, merges) = bundled_vocabulary()?;
        Self::build(vocab, merges, SpecialTokens::sdxl(SDXL_TOKENIZER_2_PAD))
    }

    /// Assembles the pipeline of transformers' `CLIPTokenizer.__init__`, then registers the added
    /// and special tokens as `TokenizersBackend` does (all of them special; their `normalized`
    /// flag as configured, `false` for special tokens the config does not list).
    fn build(vocab: HashMap<String, u32>, merges: Merges, specials: SpecialTokens) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_owned())
            .fuse_unk(false)
            .unk_token(specials.unk.clone())
            .build()
            .map_err(tokenizer_error)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = Normalizers::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
                .map_err(tokenizer_error)?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(tokenizer_error)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.to_owned()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tokenizer_error)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));

        let mut tokens = specials.added.clone();
        for name in [&specials.bos, &specials.eos, &specials.unk, &specials.pad] {
            if !tokens.iter().any(|t| &t.content == name) {
                tokens.push(AddedTokenSpec::special(name));
            }
        }
        tokenizer
            .add_special_tokens(tokens.into_iter().map(|t| {
                AddedToken::from(t.content, true)
                    .normalized(t.normalized)
                    .lstrip(t.lstrip)
                    .rstrip(t.rstrip)
                    .single_word(t.single_word)
            }))
            .map_err(tokenizer_error)?;

        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| invalid(format!("special token {token:?} is not in the vocabulary")))
        };
        let (bos_id, eos_id, pad_id) = (id(&specials.bos)?, id(&specials.eos)?, id(&specials.pad)?);
        if specials.model_max_length < 2 {
            return Err(invalid(format!(
                "model_max_length {} leaves no room for BOS and EOS",
                specials.model_max_length
            )));
        }
        Ok(ClipTokenizer {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: specials.model_max_length,
        })
    }

    /// The ids of `text` alone: no BOS/EOS, no truncation, no padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)`:
    /// BOS, the text's ids cut to `max_length − 2`, EOS, pad ids up to `max_length`.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt> {
        let text_ids = self.tokenize(text)?;
        let kept = text_ids.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(i64::from(self.bos_id));
        ids.extend(text_ids[..kept].iter().map(|&id| i64::from(id)));
        ids.push(i64::from(self.eos_id));
        ids.resize(self.max_length, i64::from(self.pad_id));
        Ok(TokenizedPrompt {
            ids,
            truncated: text_ids.len() - kept,
        })
    }

    /// The id of a vocabulary or added token (a BPE symbol such as `cat</w>`), if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The length [`ClipTokenizer::encode`] pads and truncates to (`model_max_length`, 77 for SDXL).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of `<|startoftext|>` (49406).
    pub fn bos_token_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of `<|endoftext|>` (49407).
    pub fn eos_token_id(&self) -> u32 {
        self.eos_id
    }

    /// The id rows are padded with: 49407 for SDXL's tokenizer 1, 0 (`!`) for tokenizer 2.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }
}

/// The vocabulary and merges of OpenAI's CLIP BPE, from the bundled merges: 256 byte symbols,
/// the same with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`.
fn bundled_vocabulary() -> Result<(HashMap<String, u32>, Merges)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BUNDLED_MERGES)
        .read_to_string(&mut text)
        .map_err(|e| invalid(format!("bundled CLIP merges: {e}")))?;
    let merges = parse_merges(&text)?;
    let bytes = byte_symbols();
    let mut tokens: Vec<String> = bytes.iter().map(char::to_string).collect();
    tokens.extend(bytes.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(START_OF_TEXT.to_owned());
    tokens.push(END_OF_TEXT.to_owned());
    let vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            u32::try_from(id)
                .map(|id| (token, id))
                .map_err(|_| invalid("bundled vocabulary too large".to_owned()))
        })
        .collect::<Result<_>>()?;
    Ok((vocab, merges))
}

/// GPT-2's printable stand-ins for the 256 byte values, in the order CLIP numbers them: the
/// printable Latin-1 bytes as themselves, then the rest mapped to U+0100 onwards.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut symbols: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    symbols.extend(
        (0..256u32)
            .filter(|&b| !printable(b))
            .zip(256u32..)
            .filter_map(|(_, c)| char::from_u32(c)),
    );
    symbols
}

/// `merges.txt`: an optional `#version` line, then one `left right` pair per line.
/// The BPE model's vocabulary and merges from a `tokenizer.json` (merges as `"a b"` strings or
/// `["a", "b"]` pairs, as tokenizers' two serialisations have them).
fn vocabulary_from_tokenizer_json(path: &Path) -> Result<(HashMap<String, u32>, Merges)> {
    #[derive(serde::Deserialize)]
    struct File {
        model: Model,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        vocab: HashMap<String, u32>,
        merges: Vec<Merge>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Merge {
        Joined(String),
        Pair(String, String),
    }
    let file: File = serde_json::from_str(&read_text(path)?)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let merges = file
        .model
        .merges
        .into_iter()
        .map(|merge| match merge {
            Merge::Pair(a, b) => Ok((a, b)),
            Merge::Joined(text) => text
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| {
                    invalid(format!("{}: merge {text:?} is not a pair", path.display()))
                }),
        })
        .collect::<Result<Merges>>()?;
    Ok((file.model.vocab, merges))
}

fn parse_merges(text: &str) -> Result<Merges> {
    text.lines()
        .filter(|line| !line.starts_with("#version") && !line.is_empty())
        .enumerate()
        .map(|(n, line)| {
            line.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| invalid(format!("merge {} {line:?} is not a pair", n + 1)))
        })
        .collect()
}

/// A special token written either as a string or as `{"content": …}`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    serde_json::from_str(&read_text(path)?)
        .map(Some)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidConfig {
        component: "tokenizer",
        message,
    }
}

fn tokenizer_error(error: impl fmt::Display) -> EngineError {
    EngineError::Tokenizer(error.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn byte_symbols_are_gpt2s_table() {
        let symbols = byte_symbols();
        assert_eq!(symbols.len(), 256);
        assert_eq!(symbols[0], '!');
        assert_eq!(symbols[93], '~');
        assert_eq!(symbols[94], '¡');
        // Byte 0 is the first non-printable one: U+0100; the space (0x20) is U+0120 'Ġ'.
        assert_eq!(symbols[188], '\u{100}');
        assert_eq!(symbols[188 + 0x20], 'Ġ');
    }

    #[test]
    fn bundled_tokenizers_know_clip_ids() {
        let tokenizer = ClipTokenizer::bundled_sdxl_tokenizer().unwrap();
        let prompt = tokenizer.encode("a photo of a cat").unwrap();
        assert_eq!(
            &prompt.ids[..8],
            &[49406, 320, 1125, 539, 320, 2368, 49407, 49407]
        );
        assert_eq!(prompt.ids.len(), MAX_LENGTH);
        let tokenizer_2 = ClipTokenizer::bundled_sdxl_tokenizer_2().unwrap();
        let prompt = tokenizer_2.encode("wow!!").unwrap();
        assert_eq!(&prompt.ids[..6], &[49406, 2781, 0, 0, 49407, 0]);
        assert_eq!(tokenizer_2.pad_token_id(), 0);
    }
}
