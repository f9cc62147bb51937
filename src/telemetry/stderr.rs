//! Log lines to stderr without making requests wait for the write.
//!
//! `std::io::stderr()` takes a process-wide lock and makes one `write` per
//! line. Under load two runtime workers log at the same moment, and the one
//! that loses sleeps on the lock until the other's system call returns; and
//! each `write` of one line to a file or pipe costs more than the line
//! (measured: the access log was a sixth of the router's CPU per request,
//! see `benches/README.md`).
//!
//! So every thread appends its lines to a buffer of its own, and one writer
//! thread writes all buffers out every [`FLUSH_INTERVAL`] (sooner when a
//! buffer passes [`FLUSH_AT`]), as nginx does with `access_log … buffer=
//! flush=`. Appending takes only the thread's own buffer lock, which the
//! writer holds just long enough to swap the buffer for an empty one, never
//! across a system call. Lines of one thread stay in order and whole lines
//! are written, one writer at a time, so lines never interleave.
//!
//! A line reaches stderr at most [`FLUSH_INTERVAL`] after it was logged;
//! [`flush`] writes everything now (the binary calls it before it exits).
//! If stderr cannot keep up, a thread holds at most [`MAX_PENDING`] bytes;
//! lines beyond that are dropped and counted, and the count is logged once
//! stderr drains.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

use crate::util::locked;

/// How long a line may wait in its thread's buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full wakes the writer early.
const FLUSH_AT: usize = 64 * 1024;
/// A buffer this full drops further lines until the writer catches up.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// One thread's lines.
#[derive(Default)]
struct Pending {
    lines: Mutex<String>,
    dropped: AtomicU64,
}

/// Every thread's buffer, and the writer that empties them.
struct Writer {
    buffers: Mutex<Vec<Arc<Pending>>>,
    /// Held while writing, so two flushes never interleave their output.
    turn: Mutex<()>,
    thread: OnceLock<Thread>,
}

static WRITER: Writer = Writer {
    buffers: Mutex::new(Vec::new()),
    turn: Mutex::new(()),
    thread: OnceLock::new(),
};

thread_local! {
    static MINE: Arc<Pending> = register();
}

/// The calling thread's buffer, known to the writer (started on first use).
fn register() -> Arc<Pending> {
    let pending = Arc::new(Pending::default());
    locked(&WRITER.buffers).push(pending.clone());
    WRITER.thread.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(|| loop {
                std::thread::park_timeout(FLUSH_INTERVAL);
                flush();
            })
            .map(|handle| handle.thread().clone())
            // No writer thread: lines then wait for `flush` or `FLUSH_AT`.
            .unwrap_or_else(|_| std::thread::current())
    });
    pending
}

/// Appends one whole line (ending in a newline), written by `write`, to the
/// calling thread's buffer.
pub fn write_with(write: impl FnOnce(&mut String)) {
    let mut write = Some(write);
    let _ = MINE.try_with(|pending| {
        let mut lines = locked(&pending.lines);
        if lines.len() >= MAX_PENDING {
            pending.dropped.fetch_add(1, Ordering::Relaxed);
            write = None;
            return;
        }
        if let Some(write) = write.take() {
            write(&mut lines);
        }
        let urgent = lines.len() >= FLUSH_AT;
        drop(lines);
        if urgent {
            if let Some(writer) = WRITER.thread.get() {
                writer.unpark();
            }
        }
    });
    // This thread is exiting and its buffer is gone: write the line now.
    if let Some(write) = write {
        let mut line = String::new();
        write(&mut line);
        let _turn = locked(&WRITER.turn);
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Writes every thread's pending lines now.
pub fn flush() {
    let _turn = locked(&WRITER.turn);
    let _ = flush_to(&mut io::stderr().lock());
}

/// Empties every buffer into `out`, in buffer order; forgets the buffers
/// of threads that have exited.
fn flush_to(out: &mut impl Write) -> io::Result<()> {
    let buffers: Vec<Arc<Pending>> = locked(&WRITER.buffers).clone();
    let mut dropped = 0;
    for pending in &buffers {
        let taken = {
            let mut lines = locked(&pending.lines);
            // As much room as the last interval needed, so the thread does
            // not grow its buffer again (copying it) line by line.
            let room = String::with_capacity(lines.len().min(MAX_PENDING));
            std::mem::replace(&mut *lines, room)
        };
        dropped += pending.dropped.swap(0, Ordering::Relaxed);
        // Logging must never fail a request; a closed stderr loses lines.
        out.write_all(taken.as_bytes())?;
    }
    // An exited thread's `Arc` is gone: only this list and `buffers` hold it.
    locked(&WRITER.buffers).retain(|pending| Arc::strong_count(pending) > 2 || !locked(&pending.lines).is_empty());
    if dropped > 0 {
        tracing::warn!(dropped, "log lines dropped: stderr could not keep up");
    }
    Ok(())
}

/// The `tracing_subscriber` writer: one [`Line`] per event.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// Receives one formatted event (the fmt layer makes a single `write_all`
/// of the whole line, always UTF-8: it formats into a `String`).
pub struct Line;

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        write_with(|out| out.push_str(&String::from_utf8_lossy(bytes)));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_many_threads_come_out_whole_and_in_each_threads_order() {
        // Holding the turn keeps the writer thread from writing them to
        // stderr meanwhile: every line ends up here.
        let turn = locked(&WRITER.turn);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..500 {
                        write_with(|out| {
                            use std::fmt::Write as _;
                            let _ = writeln!(out, "unit-test-line thread={t} n={i} {}", "x".repeat(i % 97));
                        });
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let mut out = Vec::new();
        flush_to(&mut out).unwrap();
        drop(turn);
        let text = String::from_utf8(out).unwrap();
        let ours: Vec<&str> = text.lines().filter(|l| l.starts_with("unit-test-line ")).collect();
        assert_eq!(ours.len(), 4 * 500);
        let mut next = [0usize; 4];
        for line in &ours {
            let mut words = line.split(' ');
            let thread: usize = words.nth(1).unwrap().strip_prefix("thread=").unwrap().parse().unwrap();
            let n: usize = words.next().unwrap().strip_prefix("n=").unwrap().parse().unwrap();
            assert_eq!(n, next[thread], "thread {thread}'s lines in order");
            next[thread] = n + 1;
            assert_eq!(words.next().unwrap().len(), n % 97, "a whole line");
        }
        let exited = locked(&WRITER.buffers)
            .iter()
            .filter(|p| Arc::strong_count(p) == 1)
            .count();
        assert_eq!(exited, 0, "the buffers of exited threads are forgotten once empty");
    }
}
