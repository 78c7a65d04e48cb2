//! Multi-step operations whose every step can be undone: if a later step
//! fails (or the operation is dropped half way), the undo actions of the
//! steps before it run in reverse order and leave nothing behind.

use std::sync::OnceLock;

use crate::error::{OpError, OpResult};

/// Test seam for crash tests: the step at which the whole process SIGKILLs
/// itself, as a power cut or the OOM killer would, with no undo run.
static KILL_AT: OnceLock<String> = OnceLock::new();

/// Makes the process SIGKILL itself on reaching the step named `step` (in
/// any operation). Set once, at daemon start.
pub fn set_kill_point(step: &str) {
    let _ = KILL_AT.set(step.to_string());
}

/// Test seam for tests of what happens while an operation is under way:
/// the step at which the process stalls for a while.
static SLOW_AT: OnceLock<(String, std::time::Duration)> = OnceLock::new();

/// Makes every operation reaching the step named `step` stall for `how_long`
/// (a whole worker thread, as a slow disk would). Set once, at daemon start.
pub fn set_slow_point(step: &str, how_long: std::time::Duration) {
    let _ = SLOW_AT.set((step.to_string(), how_long));
}

type UndoFn = Box<dyn FnOnce() + Send>;

/// Dies here if the kill point names `step`.
pub fn kill_point(step: &str) {
    if KILL_AT.get().is_some_and(|k| k == step) {
        tracing::warn!(step, "kill point reached: SIGKILL");
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Test seam: make the step with this name fail.
#[derive(Clone, Default, Debug)]
pub struct FailPoint(pub Option<String>);

pub struct Steps {
    undo: Vec<(String, UndoFn)>,
    fail_at: FailPoint,
    done: bool,
}

impl Steps {
    pub fn new(fail_at: FailPoint) -> Steps {
        Steps {
            undo: Vec::new(),
            fail_at,
            done: false,
        }
    }

    /// Marks the start of a step; fails when the fail point names it.
    pub fn begin(&self, step: &str) -> OpResult<()> {
        kill_point(step);
        if let Some((_, how_long)) = SLOW_AT.get().filter(|(s, _)| s == step) {
            tracing::warn!(step, "slow point reached: stalling");
            std::thread::sleep(*how_long);
        }
        if self.fail_at.0.as_deref() == Some(step) {
            return Err(OpError::internal(format!(
                "injected failure at step `{step}`"
            )));
        }
        Ok(())
    }

    /// Registers how to undo the step that just succeeded.
    pub fn undo(&mut self, step: &str, f: impl FnOnce() + Send + 'static) {
        self.undo.push((step.to_string(), Box::new(f)));
    }

    /// Everything succeeded: keep it.
    pub fn commit(mut self) {
        self.done = true;
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        while let Some((step, f)) = self.undo.pop() {
            tracing::info!(step = %step, "undoing");
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn undo_runs_in_reverse_unless_committed() {
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let mut s = Steps::new(FailPoint::default());
            for name in ["a", "b", "c"] {
                s.begin(name).unwrap();
                let log = log.clone();
                s.undo(name, move || log.lock().unwrap().push(name));
            }
        }
        assert_eq!(*log.lock().unwrap(), ["c", "b", "a"]);
        log.lock().unwrap().clear();
        let mut s = Steps::new(FailPoint(Some("b".into())));
        s.begin("a").unwrap();
        let l = log.clone();
        s.undo("a", move || l.lock().unwrap().push("a"));
        assert!(s.begin("b").is_err());
        drop(s);
        assert_eq!(*log.lock().unwrap(), ["a"]);
        let s = Steps::new(FailPoint::default());
        s.commit();
    }
}
