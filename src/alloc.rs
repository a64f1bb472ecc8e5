//! The binary's global allocator: mimalloc, called the way its fast paths expect.
//!
//! The `mimalloc` crate's allocator hands every allocation to `mi_malloc_aligned`, alignment
//! included. In mimalloc 3 that call takes the plain allocation path only when a block of the
//! right size happens to be free and aligned, or when the rounded size is a power of two;
//! otherwise (a 200-byte header buffer, say) it over-allocates by the alignment and marks the
//! page as holding aligned blocks. On a chat request that was 4.7 over-allocations among 20
//! allocations, about 2 % of the request's instructions (callgrind, `benches/instructions.sh`).
//!
//! Here an allocation whose alignment is at most 16 bytes and whose size is a multiple of it
//! goes to plain `mi_malloc`: mimalloc's size classes are multiples of 8 bytes, multiples of
//! 16 above 16 bytes, and a page's first block is 16-byte aligned, so every block of such a
//! class meets such an alignment (the test below checks this over many sizes and pages).
//! Anything else keeps the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment every mimalloc block of a size that is a multiple of it already has (up to this).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator]` in the binary and the memory bench).
pub struct Allocator;

/// Whether a block from plain `mi_malloc(size)` is aligned for `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && size & (align - 1) == 0
}

// SAFETY: every pointer returned comes from mimalloc, which frees and reallocates blocks from
// its plain and aligned calls alike (`mi_free` and `mi_realloc` take either), and is aligned
// for the layout: plain calls only where `natural` holds (see the module note), the aligned
// calls otherwise. Null is returned on exhaustion, as `GlobalAlloc` requires.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; any size and power-of-two alignment is accepted.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block is aligned as in `alloc` (a block
        // kept in place was aligned already).
        unsafe {
            if natural(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates `layout` through `Allocator`, checks its alignment, fills it, and returns it.
    fn take(layout: Layout, zeroed: bool) -> *mut u8 {
        let p = unsafe {
            if zeroed {
                Allocator.alloc_zeroed(layout)
            } else {
                Allocator.alloc(layout)
            }
        };
        assert!(!p.is_null(), "{layout:?}");
        assert_eq!(
            p as usize % layout.align(),
            0,
            "misaligned block for {layout:?}"
        );
        if zeroed {
            let all_zero = unsafe { std::slice::from_raw_parts(p, layout.size()) }
                .iter()
                .all(|b| *b == 0);
            assert!(all_zero, "alloc_zeroed left bytes set for {layout:?}");
        }
        unsafe { p.write_bytes(0xa5, layout.size()) };
        p
    }

    #[test]
    fn every_block_is_aligned_for_its_layout() {
        // Every size up to 4 KiB and many up to 9 KiB (multiples of the alignment or not),
        // in every alignment up to 64 (plain and aligned paths), several blocks of each so
        // that several pages and page offsets of each size class are seen.
        for align in [1usize, 2, 4, 8, 16, 32, 64] {
            let mut held = Vec::new();
            for size in (1..=4096).chain((4097..=9 * 1024).step_by(7)) {
                let layout = Layout::from_size_align(size, align).unwrap();
                for i in 0..4 {
                    held.push((take(layout, i % 2 == 1), layout));
                }
            }
            for (p, layout) in held {
                unsafe { Allocator.dealloc(p, layout) };
            }
        }
        // Large blocks and page-sized alignments.
        for (size, align) in [(1 << 20, 16), (3 << 20, 8), (4096, 4096), (8192, 2048)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            let p = take(layout, false);
            unsafe { Allocator.dealloc(p, layout) };
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for align in [1usize, 8, 16, 32] {
            let mut layout = Layout::from_size_align(align, align).unwrap();
            let mut p = take(layout, false);
            unsafe { p.write_bytes(0, layout.size()) };
            let mut filled = 0;
            // Grow through many size classes, then shrink, checking the bytes written so far.
            let sizes: Vec<usize> = (1..=40)
                .map(|i| i * i * align)
                .chain((1..=40).rev().map(|i| i * align))
                .collect();
            for new_size in sizes {
                for k in filled..layout.size().min(new_size) {
                    unsafe { *p.add(k) = (k % 251) as u8 };
                }
                filled = layout.size().min(new_size);
                p = unsafe { Allocator.realloc(p, layout, new_size) };
                assert!(!p.is_null());
                assert_eq!(
                    p as usize % align,
                    0,
                    "realloc to {new_size} (align {align})"
                );
                let kept = unsafe { std::slice::from_raw_parts(p, filled) };
                assert!(
                    kept.iter().enumerate().all(|(k, b)| *b == (k % 251) as u8),
                    "realloc to {new_size} lost bytes"
                );
                layout = Layout::from_size_align(new_size, align).unwrap();
            }
            unsafe { Allocator.dealloc(p, layout) };
        }
    }
}
