//! SQLite allocates through the process's Rust global allocator once the toolkit's drivers are
//! installed (its own test binary: the routing only takes before SQLite's first use).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, remembering the largest block asked for.
struct Watching;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

#[test]
fn sqlite_allocates_through_the_rust_allocator() {
    event_toolkit::db::install_drivers();
    const BIG: usize = 64 << 20;
    // SAFETY: plain sqlite3_malloc/realloc/free of a block nobody else sees.
    unsafe {
        let p = rusqlite::ffi::sqlite3_malloc(BIG as i32);
        assert!(!p.is_null());
        assert!(
            LARGEST.load(Ordering::Relaxed) >= BIG,
            "a 64 MiB sqlite3_malloc did not reach the Rust allocator"
        );
        assert!(rusqlite::ffi::sqlite3_msize(p) as usize >= BIG);
        let q = rusqlite::ffi::sqlite3_realloc(p, (2 * BIG) as i32);
        assert!(!q.is_null());
        assert!(LARGEST.load(Ordering::Relaxed) >= 2 * BIG);
        rusqlite::ffi::sqlite3_free(q);
    }
    // SQLite's global counters are off: nothing counted.
    assert_eq!(unsafe { rusqlite::ffi::sqlite3_memory_used() }, 0);
}
