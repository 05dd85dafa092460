//! Large read-mostly buffers on transparent huge pages, where the OS gives them.
//!
//! A decode step streams every packed weight once ([`repack`](super::repack)). On 4 KB pages that
//! stream misses the TLB every 4 KB, and in a virtual machine each miss walks two page tables.
//! Measured on a 2-core AMD EPYC VM (AVX-512 VNNI path, one thread): Gemma 3's Q8_0 output layer
//! (178 MB packed) is read at 13.8 GB/s on 4 KB pages and at 31.6 GB/s on 2 MB pages; a Q4_0 matrix
//! of the same shape at 16.4 and 26.6 GB/s.
//!
//! [`HugeBuf::zeroed`] gives a buffer of [`HUGE_PAGE`] bytes or more a private anonymous mapping of
//! its own, starting on a 2 MB boundary, and on Linux and Android asks for huge pages
//! (`madvise(MADV_HUGEPAGE)`) before anything touches it. The kernel honours that where transparent
//! huge pages are `always` or `madvise` (most desktop distributions' default); elsewhere, and on
//! other systems, the buffer is an ordinary one. Smaller buffers are plain `Vec`s, and so is any
//! buffer whose mapping fails. Resident memory is the same either way: the 2 MB of address space
//! mapped beyond the buffer for its alignment is never touched.

use bytemuck::Pod;
use memmap2::MmapMut;

/// The huge page size asked for (x86-64's and 4 KB-page aarch64's), and the smallest buffer mapped
/// on its own.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialized, fixed-length buffer of plain values; see the module doc.
pub(crate) struct HugeBuf<T: Pod> {
    store: Store<T>,
}

enum Store<T> {
    Vec(Vec<T>),
    /// `len` values at byte `offset` (a multiple of [`HUGE_PAGE`] from the address space's start).
    Map {
        map: MmapMut,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> HugeBuf<T> {
    /// `len` zeros: on huge pages where the buffer is at least [`HUGE_PAGE`] bytes and the OS allows.
    pub(crate) fn zeroed(len: usize) -> HugeBuf<T> {
        let bytes = len.saturating_mul(size_of::<T>());
        if bytes >= HUGE_PAGE {
            if let Ok(map) = MmapMut::map_anon(bytes.saturating_add(HUGE_PAGE)) {
                let offset = map.as_ptr().align_offset(HUGE_PAGE);
                ask_for_huge_pages(&map[offset..offset + bytes]);
                return HugeBuf {
                    store: Store::Map { map, offset, len },
                };
            }
        }
        HugeBuf {
            store: Store::Vec(vec![T::zeroed(); len]),
        }
    }

    /// Whether the buffer has a mapping of its own (the huge pages were asked for).
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Map { .. })
    }
}

/// `madvise(MADV_HUGEPAGE)` over `bytes`' whole 2 MB extents; a refusal leaves ordinary pages.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn ask_for_huge_pages(bytes: &[u8]) {
    let start = bytes.as_ptr() as usize;
    let end = (start + bytes.len()) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside a live private anonymous mapping this module owns; the
        // advice changes no content.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn ask_for_huge_pages(_bytes: &[u8]) {}

impl<T: Pod> std::ops::Deref for HugeBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.store {
            Store::Vec(v) => v,
            Store::Map { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + len * size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.store {
            Store::Vec(v) => v,
            Store::Map { map, offset, len } => {
                bytemuck::cast_slice_mut(&mut map[*offset..*offset + *len * size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeBuf")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn small_buffers_are_vecs_and_large_ones_aligned_mappings() {
        let small = HugeBuf::<f32>::zeroed(1000);
        assert!(!small.is_mapped() && small.len() == 1000);
        assert!(small.iter().all(|&x| x == 0.0));
        for len in [HUGE_PAGE / 2, HUGE_PAGE / 2 + 3, 3 * HUGE_PAGE / 2] {
            let mut big = HugeBuf::<f16>::zeroed(len);
            assert!(big.is_mapped(), "{len}");
            assert_eq!(big.len(), len);
            assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
            assert!(big.iter().all(|x| x.to_bits() == 0));
            for (i, x) in big.iter_mut().enumerate() {
                *x = f16::from_f32((i % 2048) as f32);
            }
            assert_eq!(big[len - 1].to_f32(), ((len - 1) % 2048) as f32);
        }
        assert!(HugeBuf::<u8>::zeroed(0).is_empty());
    }

    /// Where the system offers transparent huge pages (`always` or `madvise`), a large buffer
    /// written once sits on them: its mapping's `AnonHugePages` in `/proc/self/smaps`. x86-64 only:
    /// the aarch64 tests run under qemu-user, which accepts `madvise` advice and drops it.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn large_buffers_get_huge_pages_where_the_system_offers_them() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !(mode.contains("[always]") || mode.contains("[madvise]")) {
            eprintln!("transparent huge pages off here ({}): skipped", mode.trim());
            return;
        }
        let mut big = HugeBuf::<u8>::zeroed(3 * HUGE_PAGE);
        big.fill(1);
        let at = big.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        let mut huge_kb = None;
        for line in smaps.lines() {
            // A mapping's header line starts with its address range `lo-hi` in hex.
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            let parsed = range
                .map(|(lo, hi)| (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)));
            if let Some((Ok(lo), Ok(hi))) = parsed {
                inside = lo <= at && at < hi;
            } else if let Some(kb) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
                huge_kb = kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<usize>()
                    .ok();
            }
        }
        let huge_kb = huge_kb.expect("the buffer's mapping in smaps");
        assert!(
            huge_kb >= 2048,
            "AnonHugePages {huge_kb} kB ({})",
            mode.trim()
        );
    }
}
