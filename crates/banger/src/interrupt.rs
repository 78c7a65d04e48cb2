//! What Ctrl-C means for a long request: the CLI leaves, the daemon carries
//! on (a request is not cancelled by its caller going away, so a VM or an
//! image is never left half made), and the user is told so and how to undo.

use std::sync::OnceLock;

static NOTE: OnceLock<Vec<u8>> = OnceLock::new();

extern "C" fn on_interrupt(sig: libc::c_int) {
    if let Some(note) = NOTE.get() {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the note was
        // built before the handler was installed and is never changed.
        unsafe {
            libc::write(2, note.as_ptr().cast(), note.len());
        }
    }
    // SAFETY: as above.
    unsafe { libc::_exit(128 + sig) }
}

/// From now on, SIGINT or SIGTERM print `banger: interrupted; <what>` and
/// end the CLI with 130 (or 143).
pub fn note(what: &str) {
    let _ = NOTE.set(format!("\nbanger: interrupted; {what}\n").into_bytes());
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        let handler = on_interrupt as *const () as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}
