//! What each command does.

mod cp;
mod daemon;
mod doctor;
mod image;
mod kernel;
mod snapshot;
mod stats;
mod system;
mod tunnel;
mod vm;

pub use system::passwd_home;

use banger_core::paths::Paths;
use banger_proto::image::{RemoveParams, RemoveResult};
use banger_proto::Method;

use crate::cli::{Cli, Command};
use crate::client::{CallError, Client};
use crate::remote::Remote;

/// Commands about the machine itself rather than its daemon's VMs run on
/// the remote host whole (`doctor`, `daemon status|stop`), or are refused
/// there (`system`, `daemon run`); `None` for the rest, which talk to the
/// remote daemon through [`Remote::connect`].
fn on_remote_host(remote: &Remote, command: &Command) -> anyhow::Result<Option<i32>> {
    use crate::cli::DaemonCommand;
    let flag = |json: bool| if json { Some("--json") } else { None };
    let args: Vec<&str> = match command {
        Command::Doctor(f) => ["doctor"].into_iter().chain(flag(f.json)).collect(),
        Command::Daemon(a) => match &a.command {
            Some(DaemonCommand::Status(f)) => ["daemon", "status"]
                .into_iter()
                .chain(flag(f.json))
                .collect(),
            Some(DaemonCommand::Stop(f)) => {
                ["daemon", "stop"].into_iter().chain(flag(f.json)).collect()
            }
            _ => anyhow::bail!(
                "`banger daemon` runs the daemon of this machine; with --host, commands reach the \
                 daemon on {} (started there as needed)",
                remote.host
            ),
        },
        // Standard input goes to the remote banger as it is: the archive
        // is spooled there, where the daemon reads it.
        Command::Image(crate::cli::ImageCommand::Import {
            path,
            name,
            platform,
            json,
        }) if path == "-" => {
            let mut args = vec!["image", "import", "-"];
            if let Some(n) = name {
                args.extend(["--name", n]);
            }
            if let Some(p) = platform {
                args.extend(["--platform", p]);
            }
            args.extend(flag(*json));
            args
        }
        Command::System(_) => anyhow::bail!(
            "`banger system` changes this machine's services; run it on {} itself",
            remote.host
        ),
        _ => return Ok(None),
    };
    remote.run_there(&args, false).map(Some)
}

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let paths = Paths::from_env();
    let remote = Remote::chosen(cli.host.as_deref())?;
    if let Some(remote) = &remote {
        if let Some(code) = on_remote_host(remote, &cli.command)? {
            return Ok(code);
        }
    }
    let client = Client::with_remote(paths.clone(), remote);
    match cli.command {
        Command::Daemon(args) => daemon::run(paths, args.command),
        Command::Image(cmd) => image::run(&client, cmd),
        Command::Kernel(cmd) => kernel::run(&client, cmd),
        Command::Vm(cmd) => vm::run(&client, cmd),
        Command::Snapshot(cmd) => snapshot::run(&client, cmd),
        Command::Doctor(flags) => doctor::run(&paths, flags.json),
        Command::System(cmd) => system::run(cmd),
        Command::SshConfig(flags) => match client.remote() {
            Some(remote) => tunnel::ssh_config_remote(&client, remote, &paths, flags.json),
            None => ssh_config(&paths, flags.json),
        },
        Command::Completion { shell, bin } => {
            crate::completion::print_script(shell, bin.as_deref())
        }
        Command::Man { dir } => crate::completion::write_man_pages(&dir),
    }
}

/// Logging never fails a request: on a full disk (the daemon's log shares
/// the state filesystem) a line that cannot be written is dropped, and the
/// subscriber's own report of it is off, since that report goes through
/// `eprintln!`, which panics when stderr cannot be written.
fn init_daemon_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BANGER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false)
        .with_ansi(false)
        .init();
}

/// Standard error that drops what it cannot write instead of failing.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints a value as pretty JSON, the shape of every `--json` output.
pub fn println_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Calls a method and prints its result as pretty JSON (`inspect`).
pub fn print_json<M: Method>(client: &Client, params: M::Params) -> anyhow::Result<i32> {
    match client.call::<M>(params, |_| {}) {
        Ok(v) => {
            println_json(&v)?;
            Ok(0)
        }
        Err(e) => Ok(report(e)),
    }
}

/// Calls a `*.remove` method and prints each removed name (or, with
/// `--json`, `{"removed": […]}`).
pub fn print_removed<M: Method<Params = RemoveParams, Result = RemoveResult>>(
    client: &Client,
    args: crate::cli::RmArgs,
) -> anyhow::Result<i32> {
    let params = RemoveParams {
        names: args.names,
        force: args.force,
    };
    match client.call::<M>(params, |_| {}) {
        Ok(r) if args.json => println_json(&r).map(|()| 0),
        Ok(r) => {
            for name in r.removed {
                outln!("{name}: removed");
            }
            Ok(0)
        }
        Err(e) => Ok(report(e)),
    }
}

/// The end of a `prune`: `candidates` removed (unless `dry_run`) and said,
/// one name a line, or as `{"dry_run", KEY: candidates, "removed"}`.
pub fn prune<M: Method<Params = RemoveParams, Result = RemoveResult>>(
    client: &Client,
    key: &str,
    candidates: &[String],
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let removed = if dry_run || candidates.is_empty() {
        Vec::new()
    } else {
        let params = RemoveParams {
            names: candidates.to_vec(),
            force: false,
        };
        match client.call::<M>(params, |_| {}) {
            Ok(r) => r.removed,
            Err(e) => return Ok(report(e)),
        }
    };
    if json {
        let mut said = serde_json::json!({ "dry_run": dry_run, "removed": removed });
        said[key] = serde_json::json!(candidates);
        println_json(&said)?;
    } else if dry_run {
        for name in candidates {
            outln!("would remove {name}");
        }
    } else {
        for name in &removed {
            outln!("{name}");
        }
    }
    Ok(0)
}

/// Prints a failed call the way users read errors; returns the exit code.
/// Under `--json` the error is also printed as JSON on stdout, so a
/// script reading stdout always gets JSON.
pub fn report(err: CallError) -> i32 {
    eprintln!("error: {err}");
    if crate::output::json_errors() {
        let _ = println_json(&error_json(&err));
    }
    1
}

/// `{"error": {"code", "message", "op_id"}}`; a failure to reach the
/// daemon has code `transport` and no op_id.
pub fn error_json(err: &CallError) -> serde_json::Value {
    match err {
        CallError::Daemon(body) => serde_json::json!({ "error": body }),
        CallError::Transport(e) => serde_json::json!({
            "error": { "code": "transport", "message": format!("{e:#}") }
        }),
    }
}

/// The include line for ~/.ssh/config; the daemon keeps the file current.
fn ssh_config(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    let config = banger_core::vm::ssh_config::config_path(&paths.state_dir);
    let known = banger_core::vm::ssh_config::known_hosts_path(&paths.state_dir);
    let hint = format!(
        "then `ssh NAME.vm`, scp and sftp reach every VM that has an address (banger keeps {} \
         current).",
        config.display()
    );
    print_include(&config, &known, None, &hint, json)
}

/// What `ssh-config` prints, local or remote: the Include line (and how to
/// use it), or as JSON the files and, for a remote host, its aliases.
pub(super) fn print_include(
    config: &std::path::Path,
    known: &std::path::Path,
    hosts: Option<Vec<String>>,
    hint: &str,
    json: bool,
) -> anyhow::Result<i32> {
    let include = format!(
        "Include {}",
        banger_core::vm::ssh_config::config_path_arg(config, false)
            .ok_or_else(|| banger_core::vm::ssh_config::UnquotablePath(config.to_path_buf()))?
    );
    if json {
        let mut out = serde_json::json!({
            "include": include,
            "config": config,
            "known_hosts": known,
        });
        if let Some(hosts) = hosts {
            out["hosts"] = serde_json::json!(hosts);
        }
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    outln!("{include}");
    eprintln!("Add the line above near the top of ~/.ssh/config; {hint}");
    Ok(0)
}
