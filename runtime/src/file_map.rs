//! Model files mapped read-only, and the address ranges they cover, so that memory the library no
//! longer reads can be handed back only where doing so loses nothing.
//!
//! The CPU backend copies some weights into packed forms at load (`backend/cpu/repack.rs`) and then
//! never reads the file's pages for them again. For a read-only file mapping, `MADV_DONTNEED` drops
//! those pages from the process's resident memory (they stay in the page cache and are read back if
//! touched). For memory that is not such a mapping — a model passed in as bytes, which
//! [`Model::load_from_bytes`](crate::Model::load_from_bytes) allows — the same call would zero
//! anonymous pages, so [`release`] first checks that the range lies inside a mapping registered
//! here, and leaves anything else alone.

use std::sync::Mutex;

/// The address ranges (start, end) of the live [`FileMap`]s.
static RANGES: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// A read-only memory map of a model file, registered for [`release`] while it lives.
#[derive(Debug)]
pub(crate) struct FileMap {
    map: memmap2::Mmap,
}

impl FileMap {
    /// Registers `map`.
    pub(crate) fn new(map: memmap2::Mmap) -> FileMap {
        let range = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
        RANGES.lock().unwrap_or_else(|e| e.into_inner()).push(range);
        FileMap { map }
    }
}

impl AsRef<[u8]> for FileMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        let start = self.map.as_ptr() as usize;
        let mut ranges = RANGES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ranges.iter().position(|r| r.0 == start) {
            ranges.swap_remove(i);
        }
    }
}

/// Hands the whole pages inside `bytes` back to the OS when they belong to a live [`FileMap`]
/// (Linux and Android: `MADV_DONTNEED`, which on a read-only file mapping only drops them from
/// resident memory). Elsewhere, or for other memory, nothing happens. Whether it did.
pub(crate) fn release(bytes: &[u8]) -> bool {
    let (lo, hi) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    let ranges = RANGES.lock().unwrap_or_else(|e| e.into_inner());
    if !ranges.iter().any(|&(s, e)| s <= lo && hi <= e) {
        return false;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let (start, end) = (lo.next_multiple_of(page), hi / page * page);
        if end > start {
            // SAFETY: [start, end) lies inside a live read-only file mapping (checked above under the
            // lock that its drop takes): DONTNEED there changes no content, pages are read back from
            // the file on access.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            return rc == 0;
        }
        false
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn releases_only_pages_of_a_live_file_map() {
        let path = std::env::temp_dir().join(format!("onestep-file-map-{}", std::process::id()));
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&data))
            .expect("temp file");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: a private temp file nobody truncates.
        let map = FileMap::new(unsafe { memmap2::Mmap::map(&file) }.expect("map"));
        let bytes = map.as_ref();
        let released = release(&bytes[100..40_000]);
        assert_eq!(
            released,
            cfg!(any(target_os = "linux", target_os = "android"))
        );
        // The content reads back unchanged.
        assert_eq!(bytes, &data[..]);
        // Heap memory is never touched.
        let heap = data.clone();
        assert!(!release(&heap));
        assert_eq!(heap, data);
        drop(map);
        std::fs::remove_file(&path).ok();
    }
}
