//! Log lines to stderr without making request threads wait for each other.
//!
//! `std::io::stderr()` takes a process-wide lock and makes one `write` per
//! line. Under load two runtime workers log at the same moment, and the one
//! that loses sleeps on the lock until the other's system call returns: a
//! futex wake-up and two context switches per collision, which measured as
//! the largest single cost of the access log (see `benches/README.md`).
//!
//! So a runtime worker appends each line to a buffer of its own and hands
//! the buffer over when it is about to park (it has nothing else to do), or
//! once the buffer holds [`FLUSH_AT`] bytes. Handing over never waits: the
//! buffer joins a queue, and whichever thread holds the write turn writes
//! everything queued before giving the turn up. A line therefore reaches
//! stderr no later than the moment its thread runs out of work, and only
//! whole buffers of whole lines are written, one writer at a time, so lines
//! never interleave. Threads that are not runtime workers (the blocking
//! pool, `main`) hand each line over at once. The runtime must call
//! [`flush_before_park`] from `on_thread_park` (and may from
//! `on_thread_stop`); a thread's buffer is also handed over when the thread
//! exits.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, TryLockError};

use tracing_subscriber::fmt::MakeWriter;

/// A busy worker writes its buffer out at this size even if it never parks.
const FLUSH_AT: usize = 32 * 1024;

/// Buffers handed over and not yet written. Locked only to push or take a
/// buffer, never across a system call.
static QUEUE: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The write turn: held by the one thread writing queued buffers.
static TURN: Mutex<()> = Mutex::new(());

thread_local! {
    static PENDING: RefCell<Pending> = const { RefCell::new(Pending { buffered: false, lines: String::new() }) };
}

struct Pending {
    /// Set once this thread has parked as a runtime worker: from then on its
    /// lines wait in `lines` until the next park.
    buffered: bool,
    lines: String,
}

impl Pending {
    fn flush(&mut self) {
        if !self.lines.is_empty() {
            hand_over(std::mem::take(&mut self.lines));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.flush();
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Queues `lines` (whole ones) and, unless another thread is writing
/// already, writes everything queued. The writer looks at the queue again
/// after giving up its turn, so a buffer queued while it wrote (by a thread
/// that found the turn taken) is never left behind.
fn hand_over(lines: String) {
    locked(&QUEUE).push(lines);
    loop {
        let turn = match TURN.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        let queued = std::mem::take(&mut *locked(&QUEUE));
        if queued.is_empty() {
            return;
        }
        let mut stderr = io::stderr().lock();
        for lines in &queued {
            // Logging must never fail a request; a closed stderr loses lines.
            let _ = stderr.write_all(lines.as_bytes());
        }
        drop(stderr);
        drop(turn);
    }
}

/// Writes the calling thread's pending lines and marks it as a runtime
/// worker whose lines may wait for its next park.
pub fn flush_before_park() {
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            pending.buffered = true;
            pending.flush();
        }
    });
}

/// Writes the calling thread's pending lines now.
pub fn flush_thread() {
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.try_borrow_mut() {
            pending.flush();
        }
    });
}

/// Appends one whole line (ending in a newline), written by `write`, to the
/// calling thread's batch, or hands it over at once on a thread that is not
/// a runtime worker.
pub fn write_with(write: impl FnOnce(&mut String)) {
    let mut write = Some(write);
    let _ = PENDING.try_with(|pending| {
        let Ok(mut pending) = pending.try_borrow_mut() else {
            return;
        };
        if !pending.buffered {
            return;
        }
        if pending.lines.capacity() == 0 {
            pending.lines.reserve(FLUSH_AT / 4);
        }
        if let Some(write) = write.take() {
            write(&mut pending.lines);
        }
        if pending.lines.len() >= FLUSH_AT {
            pending.flush();
        }
    });
    if let Some(write) = write {
        let mut line = String::new();
        write(&mut line);
        hand_over(line);
    }
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
