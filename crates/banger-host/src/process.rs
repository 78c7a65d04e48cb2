//! Running host programs (mkfs.ext4, debugfs, …).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{program}` was not found; install it (see `banger doctor`)")]
    NotFound { program: String },
    #[error("running `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// A request outside what banger may touch; nothing was changed.
    #[error("refused: {0}")]
    Refused(String),
    #[error("the banger root helper at {socket} is not reachable: {error}; start it (`sudo banger system install`) or run the daemon as root")]
    Helper { socket: String, error: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

impl HostError {
    /// A failure to start `program`: not installed, or another I/O error.
    pub fn spawn(program: &str, source: std::io::Error) -> HostError {
        if source.kind() == std::io::ErrorKind::NotFound {
            HostError::NotFound {
                program: program.to_string(),
            }
        } else {
            HostError::Spawn {
                program: program.to_string(),
                source,
            }
        }
    }
}

/// A program invocation, kept as data so fakes can record and match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// Bytes fed to the program's standard input (none: /dev/null).
    pub stdin: Option<Vec<u8>>,
}

impl CommandSpec {
    pub fn new(program: impl Into<String>) -> Self {
        CommandSpec {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// The command as a shell-like line, for errors and logs.
    pub fn display(&self) -> String {
        let mut line = self.program.clone();
        for arg in &self.args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a program to completion. Blocking: call it from blocking contexts.
pub trait ProcessRunner: Send + Sync {
    /// Runs `spec`; a non-zero exit is an error carrying the program's stderr.
    fn run(&self, spec: &CommandSpec) -> Result<Output, HostError>;
}

/// Runs programs for real with `std::process`.
#[derive(Debug, Default, Clone)]
pub struct RealRunner;

impl ProcessRunner for RealRunner {
    fn run(&self, spec: &CommandSpec) -> Result<Output, HostError> {
        let mut cmd = std::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        tracing::debug!(command = %spec.display(), "running");
        let mut child = cmd
            .spawn()
            .map_err(|e| HostError::spawn(&spec.program, e))?;
        if let (Some(input), Some(mut pipe)) = (&spec.stdin, child.stdin.take()) {
            use std::io::Write;
            // The program may exit without reading; its status says why.
            let _ = pipe.write_all(input);
        }
        let out = child
            .wait_with_output()
            .map_err(|e| HostError::spawn(&spec.program, e))?;
        if !out.status.success() {
            return Err(HostError::Failed {
                command: spec.display(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(Output {
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

type Responder = dyn Fn(&CommandSpec) -> Result<Output, HostError> + Send + Sync;

/// Records every command and answers with a scripted responder (success by default).
#[derive(Clone)]
pub struct FakeRunner {
    calls: Arc<Mutex<Vec<CommandSpec>>>,
    responder: Arc<Responder>,
}

impl Default for FakeRunner {
    fn default() -> Self {
        Self::new(|_| Ok(Output::default()))
    }
}

impl FakeRunner {
    pub fn new(
        responder: impl Fn(&CommandSpec) -> Result<Output, HostError> + Send + Sync + 'static,
    ) -> Self {
        FakeRunner {
            calls: Arc::default(),
            responder: Arc::new(responder),
        }
    }

    /// The commands run so far, in order.
    pub fn calls(&self) -> Vec<CommandSpec> {
        self.calls.lock().unwrap().clone()
    }
}

impl ProcessRunner for FakeRunner {
    fn run(&self, spec: &CommandSpec) -> Result<Output, HostError> {
        self.calls.lock().unwrap().push(spec.clone());
        (self.responder)(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_runner_reports_missing_programs_and_failures() {
        let err = RealRunner
            .run(&CommandSpec::new("banger-no-such-program"))
            .unwrap_err();
        assert!(matches!(err, HostError::NotFound { .. }), "{err}");
        let err = RealRunner
            .run(&CommandSpec::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("boom") && text.contains('3'), "{text}");
        let out = RealRunner
            .run(&CommandSpec::new("sh").args(["-c", "printf hi"]))
            .unwrap();
        assert_eq!(out.stdout, b"hi");
    }

    #[test]
    fn fake_runner_records_calls_in_order() {
        let fake = FakeRunner::default();
        fake.run(&CommandSpec::new("a").arg("1")).unwrap();
        fake.run(&CommandSpec::new("b")).unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].display(), "a 1");
        assert_eq!(calls[1].program, "b");
    }
}
