//! The content type of an upload, sniffed from its first bytes (never from the file name).

/// The MIME type of `bytes` from their signature: JPEG, PNG, WebP, GIF, TIFF, HEIF/AVIF;
/// `application/octet-stream` for anything else (the pipeline then refuses it with
/// `unsupported_format`, the same as it would refuse a mislabelled file).
pub fn content_type(bytes: &[u8]) -> &'static str {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        "image/gif"
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        "image/tiff"
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        match &bytes[8..12] {
            b"avif" | b"avis" => "image/avif",
            b"heic" | b"heix" | b"heim" | b"heis" | b"mif1" | b"msf1" => "image/heic",
            _ => "application/octet-stream",
        }
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_decide_not_extensions() {
        assert_eq!(content_type(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]), "image/jpeg");
        assert_eq!(content_type(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert_eq!(content_type(b"RIFF\x10\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(content_type(b"\0\0\0\x18ftypheic\0\0\0\0"), "image/heic");
        assert_eq!(content_type(b"\0\0\0\x18ftypavif\0\0\0\0"), "image/avif");
        assert_eq!(content_type(b"<svg xmlns="), "application/octet-stream");
        assert_eq!(
            content_type(b"RIFF\x10\0\0\0WAVE"),
            "application/octet-stream"
        );
        assert_eq!(content_type(b""), "application/octet-stream");
    }
}
