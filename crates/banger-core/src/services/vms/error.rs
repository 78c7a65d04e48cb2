//! What can be wrong with a VM a request names (`error.rs` maps it to the
//! wire's error codes).

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No record by that name; `hint` offers a near name or the list command.
    #[error("no VM named `{name}`{hint}")]
    NotFound { name: String, hint: String },
    #[error("a VM named `{0}` exists; pick another name or run `banger vm rm -f {0}`")]
    Exists(String),
    #[error("VM `{0}` is stopped; run `banger vm start {0}`")]
    Stopped(String),
    /// Gone while a request was using it (a forward, a log follow).
    #[error("VM `{0}` stopped")]
    StoppedMeanwhile(String),
    #[error("VM `{0}` is paused; run `banger vm resume {0}`")]
    Paused(String),
    #[error("VM `{0}` is running; stop it first (`banger vm stop {0}`) or pass -f")]
    Running(String),
    /// Its agent could not be reached or failed mid-call.
    #[error("VM `{name}`: {why}")]
    Agent { name: String, why: String },
}
