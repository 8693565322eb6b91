//! Step 1: the real format of an upload, from its magic bytes.
//!
//! The extension and the Content-Type are chosen by whoever uploads, so they are never
//! consulted. Only the formats on the allow-list go on to a decoder; everything else is
//! named (for the failure message) and refused.

use crate::PreprocessError;

/// An image format Darkroom decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// JPEG (JFIF/EXIF), starts with `FF D8 FF`.
    Jpeg,
    /// PNG, starts with the 8-byte PNG signature.
    Png,
    /// WebP, a RIFF container of form type `WEBP`.
    Webp,
}

impl SourceFormat {
    /// Lower-case short name, as in messages and job records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
            Self::Webp => "webp",
        }
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Sniffs `bytes` and returns the format if it is on the allow-list.
///
/// # Errors
/// [`PreprocessError::UnsupportedFormat`] naming what was detected otherwise
/// (`"empty"`, `"gif"`, `"svg"`, `"heic"`, … or `"unknown"`).
pub fn sniff(bytes: &[u8]) -> Result<SourceFormat, PreprocessError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(SourceFormat::Jpeg);
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return Ok(SourceFormat::Png);
    }
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(SourceFormat::Webp);
    }
    Err(PreprocessError::UnsupportedFormat {
        detected: detect_other(bytes),
    })
}

/// Names a refused format, for the message only: nothing here is ever decoded.
fn detect_other(bytes: &[u8]) -> &'static str {
    if bytes.is_empty() {
        return "empty";
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return "gif";
    }
    if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        return "tiff";
    }
    if bytes.starts_with(b"%PDF-") {
        return "pdf";
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return "zip";
    }
    if bytes.starts_with(b"BM") {
        return "bmp";
    }
    // ISO base media (HEIF/AVIF/MP4): a box of type `ftyp` at offset 4, brand at 8.
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return match &bytes[8..12] {
            b"avif" | b"avis" => "avif",
            b"heic" | b"heix" | b"heim" | b"heis" | b"hevc" | b"hevx" | b"mif1" | b"msf1" => "heic",
            _ => "iso-bmff",
        };
    }
    if bytes.starts_with(PNG_SIGNATURE.get(..4).unwrap_or_default()) {
        return "truncated-png";
    }
    detect_text(bytes)
}

/// SVG, HTML and other XML all start (after optional BOM and whitespace) with `<`.
fn detect_text(bytes: &[u8]) -> &'static str {
    let head = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let head = &head[..head.len().min(1024)];
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let head = head[start..].to_ascii_lowercase();
    if !head.starts_with(b"<") {
        return "unknown";
    }
    let contains = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    if contains(b"<svg") {
        "svg"
    } else if contains(b"<html") || contains(b"<!doctype html") {
        "html"
    } else {
        "xml"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_by_magic() {
        assert_eq!(
            sniff(b"\xFF\xD8\xFF\xE0rest").ok(),
            Some(SourceFormat::Jpeg)
        );
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\nrest").ok(),
            Some(SourceFormat::Png)
        );
        assert_eq!(
            sniff(b"RIFF\0\0\0\0WEBPVP8 ").ok(),
            Some(SourceFormat::Webp)
        );
    }

    #[test]
    fn others_are_named() {
        let detected = |b: &[u8]| match sniff(b) {
            Err(PreprocessError::UnsupportedFormat { detected }) => detected,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(detected(b""), "empty");
        assert_eq!(detected(b"GIF89a...."), "gif");
        assert_eq!(detected(b"\0\0\0\x18ftypheic\0\0\0\0"), "heic");
        assert_eq!(detected(b"\0\0\0\x1cftypavif\0\0\0\0"), "avif");
        assert_eq!(
            detected(b"  <?xml version=\"1.0\"?><svg xmlns=\"\">"),
            "svg"
        );
        assert_eq!(detected(b"<!DOCTYPE html><html>"), "html");
        assert_eq!(detected(b"RIFF\0\0\0\0WAVEfmt "), "unknown");
    }
}
