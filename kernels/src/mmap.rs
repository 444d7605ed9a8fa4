//! Read-only memory maps of model files.
//!
//! Why a map: a GGUF artifact is hundreds of megabytes of tensor data read
//! once at load. Reading it through a map lets the kernel page it in directly
//! (no `read` syscall per tensor, no second buffered copy), and a reload of a
//! file still in the page cache costs only the tensor copies. `memmap2` is the
//! maintained crate candle itself uses for safetensors.
//!
//! Mapping a file is `unsafe` because another process could change or shrink
//! the file while it is mapped. This module is the one place that takes that
//! on (the rest of the workspace forbids `unsafe`), under the invariant below.
//!
//! Invariant: Arqon only maps files it treats as immutable — model files and
//! variant artifacts are written to a temporary name and renamed into place,
//! never rewritten in place — and the map is held only while a loader copies
//! tensors out of it.

use std::fs::File;
use std::path::Path;

/// A read-only map of a whole file.
#[derive(Debug)]
pub struct ReadOnlyMap {
    map: memmap2::Mmap,
}

impl ReadOnlyMap {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the file is opened read-only and, per the module invariant,
        // is never modified in place while mapped (writers use temp + rename,
        // which leaves this mapping on the old inode).
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        Ok(ReadOnlyMap { map })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl AsRef<[u8]> for ReadOnlyMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_file_contents() {
        let dir = std::env::temp_dir().join(format!("arqon-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        std::fs::write(&p, b"GGUF\x03\x00").unwrap();
        let m = ReadOnlyMap::open(&p).unwrap();
        assert_eq!(m.bytes(), b"GGUF\x03\x00");
        assert!(ReadOnlyMap::open(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
