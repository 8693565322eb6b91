//! SHA-256 of weights files, for the `model`, `loras` and `controlnets` a `completed` event
//! names: whoever holds the same files can reproduce the picture.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of a file's bytes, read in 1 MiB blocks.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The digest of a set of files under `root`: SHA-256 of the lines
/// `<file sha256>  <path relative to root>\n`, sorted by path — what `sha256sum` prints for
/// them, sorted. One file given as `root` itself is hashed alone (a single-file checkpoint).
pub fn files_sha256(root: &Path, files: &[PathBuf]) -> std::io::Result<String> {
    if files.len() == 1 && files[0] == root {
        return file_sha256(root);
    }
    let mut lines = Vec::with_capacity(files.len());
    for file in files {
        let relative = file.strip_prefix(root).unwrap_or(file);
        lines.push(format!("{}  {}\n", file_sha256(file)?, relative.display()));
    }
    lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// File digests remembered by path, size and modification time, so a LoRA used by every job
/// is hashed once and a replaced file is hashed again.
#[derive(Debug, Default)]
pub struct DigestCache {
    entries: HashMap<PathBuf, (u64, Option<SystemTime>, String)>,
}

impl DigestCache {
    /// The digest of `files` under `root` ([`files_sha256`]), from the cache when no file changed.
    pub fn get(&mut self, root: &Path, files: &[PathBuf]) -> std::io::Result<String> {
        let mut stamp_len = 0u64;
        let mut stamp_time = None;
        for file in files {
            let metadata = std::fs::metadata(file)?;
            stamp_len = stamp_len.wrapping_add(metadata.len());
            stamp_time = stamp_time.max(metadata.modified().ok());
        }
        if let Some((len, time, digest)) = self.entries.get(root)
            && *len == stamp_len
            && *time == stamp_time
        {
            return Ok(digest.clone());
        }
        let digest = files_sha256(root, files)?;
        self.entries
            .insert(root.to_owned(), (stamp_len, stamp_time, digest.clone()));
        Ok(digest)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashes_as_sha256sum_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            file_sha256(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            files_sha256(&path, std::slice::from_ref(&path)).unwrap(),
            file_sha256(&path).unwrap()
        );
    }

    #[test]
    fn a_folder_hashes_its_sorted_listing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        let a = dir.path().join("unet/w.safetensors");
        let b = dir.path().join("vae.safetensors");
        std::fs::write(&a, b"abc").unwrap();
        std::fs::write(&b, b"").unwrap();
        let listing = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  unet/w.safetensors\n\
                       e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  vae.safetensors\n";
        let expected = hex(&Sha256::digest(listing.as_bytes()));
        assert_eq!(
            files_sha256(dir.path(), &[b.clone(), a.clone()]).unwrap(),
            expected
        );
        let mut cache = DigestCache::default();
        assert_eq!(
            cache.get(dir.path(), &[a.clone(), b.clone()]).unwrap(),
            expected
        );
        std::fs::write(&b, b"changed").unwrap();
        assert_ne!(cache.get(dir.path(), &[a, b]).unwrap(), expected);
    }
}
