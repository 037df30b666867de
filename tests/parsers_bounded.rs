//! The parsers of untrusted input that the library makes public allocate in
//! proportion to their input: a counting allocator measures the most memory
//! each holds at once while reading a large hostile input. (The template and
//! selector compilers are crate-private: their unit tests bound what they
//! build by the length of the text they compile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use spiegel::config::Passwords;
use spiegel::couch::{redact_credentials, Change, ChangesPage, DbUpdate, DbUpdatesPage, SecretUrl};

/// Counts the bytes each thread holds, and the most it held, so that the
/// tests of this file, run in parallel, each measure their own calls.
struct Counting;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(bytes: usize) {
    let _ = HELD.try_with(|held| {
        held.set(held.get() + bytes);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(held.get())));
    });
}

fn shrink(bytes: usize) {
    let _ = HELD.try_with(|held| held.set(held.get().saturating_sub(bytes)));
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters are const-initialized thread-locals without destructors, which
// never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as a copy: both blocks, for a moment.
            grow(new_size);
            shrink(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes held at once while `f` ran, above what was held before,
/// what it returned included.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let out = f();
    (out, PEAK.with(Cell::get) - before)
}

const MB: usize = 1 << 20;

/// Checks that reading `input` holds at most `factor` times its length
/// plus 64 kB, and says what it held.
fn assert_bounded<T>(what: &str, input: &[u8], factor: usize, read: impl FnOnce(&[u8]) -> T) {
    let (out, peak) = peak_of(|| read(input));
    drop(out);
    let ratio = peak as f64 / input.len() as f64;
    eprintln!(
        "{what}: {} bytes in, peak {peak} bytes ({ratio:.2}x)",
        input.len()
    );
    assert!(
        peak <= factor * input.len() + 64 * 1024,
        "{what}: peak {peak} bytes for {} bytes of input ({ratio:.2}x > {factor}x)",
        input.len()
    );
}

/// `len` bytes of printable garbage, the same at every run: JSON's
/// punctuation, letters, digits, quotes and backslashes.
fn garbage(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b' ' + (state % 95) as u8
        })
        .collect()
}

/// Text of `items` made by `item`, joined by commas, about `len` bytes.
fn repeated(len: usize, item: impl Fn(usize) -> String) -> String {
    let mut out = String::with_capacity(len + 64);
    let mut i = 0;
    while out.len() < len {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item(i));
        i += 1;
    }
    out
}

#[test]
fn a_passwords_file_of_garbage_or_of_many_entries_is_read_in_bounded_memory() {
    let text = String::from_utf8(garbage(MB)).unwrap();
    assert_bounded("passwords, garbage", text.as_bytes(), 16, |t| {
        Passwords::parse(std::str::from_utf8(t).unwrap(), "p.json").is_err()
    });
    let opened = format!("{{\"h\": {{\"u\": \"{}", "x".repeat(MB));
    assert_bounded(
        "passwords, an unclosed string",
        opened.as_bytes(),
        16,
        |t| Passwords::parse(std::str::from_utf8(t).unwrap(), "p.json").is_err(),
    );
    let entries = format!(
        "{{{}}}",
        repeated(MB, |i| format!(
            "\"host{i}.example.com\": {{\"user{i}\": \"password-{i:016}\"}}"
        ))
    );
    assert_bounded("passwords, many hosts", entries.as_bytes(), 16, |t| {
        Passwords::parse(std::str::from_utf8(t).unwrap(), "p.json").unwrap()
    });
}

#[test]
fn a_changes_or_db_updates_line_of_garbage_is_refused_in_bounded_memory() {
    let line = garbage(MB);
    assert_bounded("_changes line, garbage", &line, 16, |l| {
        serde_json::from_slice::<Change>(l).is_err()
    });
    assert_bounded("_db_updates line, garbage", &line, 16, |l| {
        serde_json::from_slice::<DbUpdate>(l).is_err()
    });
    let mut after_a_start = br#"{"seq":1,"id":"a","doc":{"a":["#.to_vec();
    after_a_start.extend(garbage(MB));
    assert_bounded(
        "_changes line, garbage in a document",
        &after_a_start,
        16,
        |l| serde_json::from_slice::<Change>(l).is_err(),
    );
    let unclosed = format!(r#"{{"seq":1,"id":"a","doc":{{"a":"{}"#, "x".repeat(MB));
    assert_bounded(
        "_changes line, an unclosed string",
        unclosed.as_bytes(),
        16,
        |l| serde_json::from_slice::<Change>(l).is_err(),
    );
}

#[test]
fn a_changes_line_nested_far_deeper_than_json_allows_is_refused_in_bounded_memory() {
    let depth = MB / 2;
    let line = format!(
        r#"{{"seq":1,"id":"a","doc":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_bounded(
        "_changes line, nested 512k deep",
        line.as_bytes(),
        16,
        |l| serde_json::from_slice::<Change>(l).is_err(),
    );
    let seq = format!(
        r#"{{"seq":{}1{},"id":"a"}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_bounded(
        "_changes line, a seq nested 512k deep",
        seq.as_bytes(),
        16,
        |l| serde_json::from_slice::<Change>(l).is_err(),
    );
}

#[test]
fn a_changes_line_with_a_large_document_is_read_in_bounded_memory() {
    let text = format!(
        r#"{{"seq":"1-a","id":"a","changes":[{{"rev":"1-a"}}],"doc":{{"_id":"a","text":"{}"}}}}"#,
        "\\u00e9x".repeat(MB / 7)
    );
    assert_bounded("_changes line, a 1 MB string", text.as_bytes(), 16, |l| {
        serde_json::from_slice::<Change>(l).unwrap()
    });
    let fields = format!(
        r#"{{"seq":"1-a","id":"a","doc":{{{}}}}}"#,
        repeated(MB, |i| format!("\"field{i}\":\"value\""))
    );
    assert_bounded(
        "_changes line, a document of many fields",
        fields.as_bytes(),
        16,
        |l| serde_json::from_slice::<Change>(l).unwrap(),
    );
}

#[test]
fn the_densest_json_is_read_in_memory_bounded_by_its_tree() {
    // Documents (parsed for the rules), pages and the passwords file are
    // read into `serde_json`'s tree: 32 bytes a value, about 630 for the
    // B-tree node of each object with members, and a vector's old and new
    // blocks while it grows. Text of the smallest values and objects, a
    // few bytes each, thus takes up to about 90 times its length: still
    // in proportion to it, by the tree's factor.
    let dense = [
        ("_changes line, a document of 1-digit numbers", "0"),
        ("_changes line, a document of [0]", "[0]"),
        ("_changes line, a document of small objects", r#"{"b":1}"#),
    ];
    for (what, item) in dense {
        let line = format!(
            r#"{{"seq":"1-a","id":"a","doc":{{"n":[{}]}}}}"#,
            repeated(MB, |_| item.to_string())
        );
        assert_bounded(what, line.as_bytes(), 128, |l| {
            serde_json::from_slice::<Change>(l).unwrap()
        });
    }
    let page = format!(
        r#"{{"results":[{}],"last_seq":1}}"#,
        repeated(MB, |_| r#"[1,""]"#.to_string())
    );
    assert_bounded(
        "_changes page, results as [seq, id]",
        page.as_bytes(),
        128,
        |p| serde_json::from_slice::<ChangesPage>(p).unwrap(),
    );
    let passwords = format!("{{{}}}", repeated(MB, |i| format!(r#""{i}":{{"u":""}}"#)));
    assert_bounded(
        "passwords, the smallest hosts",
        passwords.as_bytes(),
        128,
        |t| Passwords::parse(std::str::from_utf8(t).unwrap(), "p.json").unwrap(),
    );
}

#[test]
fn a_changes_or_db_updates_page_of_many_results_is_read_in_bounded_memory() {
    let changes = format!(
        r#"{{"results":[{}],"last_seq":"9-z"}}"#,
        repeated(MB, |i| format!(
            r#"{{"seq":"{i}-g1AAAA","id":"doc{i}","changes":[{{"rev":"1-abc"}}]}}"#
        ))
    );
    assert_bounded("_changes page, many results", changes.as_bytes(), 16, |p| {
        serde_json::from_slice::<ChangesPage>(p).unwrap()
    });
    let updates = format!(
        r#"{{"results":[{}],"last_seq":"9-z"}}"#,
        repeated(MB, |i| format!(
            r#"{{"db_name":"db{i}","type":"updated","seq":"{i}-g1AAAA"}}"#
        ))
    );
    assert_bounded(
        "_db_updates page, many results",
        updates.as_bytes(),
        16,
        |p| serde_json::from_slice::<DbUpdatesPage>(p).unwrap(),
    );
    assert_bounded("_changes page, garbage", &garbage(MB), 16, |p| {
        serde_json::from_slice::<ChangesPage>(p).is_err()
    });
}

#[test]
fn a_url_or_server_text_of_garbage_is_read_in_bounded_memory() {
    // Every URL of a template or a replicator document is checked with
    // this parser once its placeholders are filled in.
    let garbage = String::from_utf8(garbage(MB)).unwrap();
    let url = format!("https://u@h/{garbage}");
    assert_bounded("URL, garbage path", url.as_bytes(), 16, |u| {
        SecretUrl::parse(std::str::from_utf8(u).unwrap()).map(|u| u.to_string())
    });
    let host = format!("https://{}/", "é".repeat(MB / 2));
    assert_bounded("URL, a 1 MB host", host.as_bytes(), 16, |u| {
        SecretUrl::parse(std::str::from_utf8(u).unwrap()).is_err()
    });
    // Feed and replication errors quote the server's text after this.
    let urls = "http://user:password@host/ ".repeat(MB / 27);
    assert_bounded("server text, many URLs", urls.as_bytes(), 16, |t| {
        redact_credentials(std::str::from_utf8(t).unwrap())
    });
}
