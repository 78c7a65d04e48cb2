//! Shell completion (clap_complete's environment-driven engine, so names
//! of VMs, images, kernels and snapshots come from the daemon as the user
//! types) and man pages (clap_mangen).

use std::time::Duration;

use banger_core::paths::Paths;
use banger_proto::rpc::{m, NoParams};
use clap::Command;
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::EnvCompleter;

use crate::cli::CompletionShell;

/// What a command-line word names, for completing it.
#[derive(Clone, Copy)]
enum Kind {
    Vm,
    Image,
    Kernel,
    Snapshot,
}

/// Which kind of name an argument takes: by the command group it is in
/// (`vm`, `image`, …), the subcommand and the argument's id.
fn kind_of(group: &str, sub: &str, arg: &str) -> Option<Kind> {
    match (group, sub, arg) {
        (_, _, "image") => Some(Kind::Image),
        (_, _, "kernel") => Some(Kind::Kernel),
        (_, _, "from") => Some(Kind::Snapshot),
        ("vm", "restore", "snapshot") => Some(Kind::Snapshot),
        ("vm", "create" | "run", "name") => None,
        ("vm", _, "name" | "names") => Some(Kind::Vm),
        ("image", _, "names") => Some(Kind::Image),
        ("kernel", _, "names") => Some(Kind::Kernel),
        ("snapshot", _, "names") => Some(Kind::Snapshot),
        _ => None,
    }
}

/// The CLI's command with name completers attached.
pub fn annotate(cmd: Command) -> Command {
    let groups: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    groups.into_iter().fold(cmd, |cmd, group| {
        cmd.mut_subcommand(&group, |g| {
            let subs: Vec<String> = g
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            subs.into_iter().fold(g, |g, sub| {
                g.mut_subcommand(&sub, |s| {
                    let ids: Vec<String> =
                        s.get_arguments().map(|a| a.get_id().to_string()).collect();
                    // `mut_arg` moves the argument last: every one is
                    // passed through, in order, so positionals keep theirs.
                    ids.into_iter().fold(s, |s, id| {
                        let kind = kind_of(&group, &sub, &id);
                        s.mut_arg(&id, |a| match kind {
                            Some(kind) => a.add(ArgValueCandidates::new(move || candidates(kind))),
                            None => a,
                        })
                    })
                })
            })
        })
    })
}

/// Names from a daemon that is already running (completion never starts
/// one), or none, within two seconds.
fn candidates(kind: Kind) -> Vec<CompletionCandidate> {
    // With BANGER_HOST, the names are the remote daemon's.
    let remote = crate::remote::Remote::chosen(None).ok().flatten();
    let client = crate::client::Client::with_remote(Paths::from_env(), remote);
    let Ok(stream) = client.connect_existing() else {
        return Vec::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let names = match kind {
        Kind::Vm => names_from::<m::VmList, _>(stream, |i| i.name),
        Kind::Image => names_from::<m::ImageList, _>(stream, |i| i.name),
        Kind::Kernel => names_from::<m::KernelList, _>(stream, |i| i.name),
        Kind::Snapshot => names_from::<m::SnapshotList, _>(stream, |i| i.name),
    };
    names.into_iter().map(CompletionCandidate::new).collect()
}

/// The names a list method answers with, or none if it fails.
fn names_from<M, T>(stream: std::os::unix::net::UnixStream, name: fn(T) -> String) -> Vec<String>
where
    M: banger_proto::rpc::Method<Params = NoParams, Result = Vec<T>>,
{
    crate::client::call_on::<M>(stream, NoParams {}, |_| {})
        .map(|v| v.into_iter().map(name).collect())
        .unwrap_or_default()
}

/// `banger completion SHELL`: the script that registers banger with the
/// shell; at each Tab the shell runs `COMPLETE=SHELL banger -- WORDS…`.
pub fn print_script(shell: CompletionShell, bin: Option<&std::path::Path>) -> anyhow::Result<i32> {
    let completer: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &clap_complete::env::Bash,
        CompletionShell::Zsh => &clap_complete::env::Zsh,
        CompletionShell::Fish => &clap_complete::env::Fish,
    };
    // The absolute path: completion works whatever PATH the shell has.
    let exe = match bin {
        Some(bin) => bin.to_path_buf(),
        None => std::env::current_exe()?,
    };
    let mut script = Vec::new();
    completer.write_registration(
        "COMPLETE",
        "banger",
        "banger",
        &exe.to_string_lossy(),
        &mut script,
    )?;
    let mut script = String::from_utf8(script)?;
    if matches!(shell, CompletionShell::Zsh) {
        script = autoloadable(&script);
    }
    out!("{script}");
    Ok(0)
}

/// The zsh script, also right as `_banger` in `fpath` (where packages put
/// it): autoloaded, it completes at once rather than only registering.
fn autoloadable(script: &str) -> String {
    const REGISTER: &str = "compdef _clap_dynamic_completer_banger banger";
    script.replace(
        REGISTER,
        &format!(
            "if [ \"$funcstack[1]\" = \"_banger\" ]; then\n    \
             _clap_dynamic_completer_banger \"$@\"\nelse\n    {REGISTER}\nfi"
        ),
    )
}

/// `banger man DIR`: one page per command (`banger-vm-run.1`, …).
pub fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<i32> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(crate::cli::command(), dir)?;
    let pages = std::fs::read_dir(dir)?.count();
    eprintln!("wrote {pages} man page(s) to {}", dir.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_arguments_complete_the_right_kind() {
        let cmd = crate::cli::command();
        let has = |path: &[&str], arg: &str| {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            let a = c.get_arguments().find(|a| a.get_id() == arg).unwrap();
            a.get::<ArgValueCandidates>().is_some()
        };
        assert!(has(&["vm", "exec"], "name"));
        assert!(has(&["vm", "stop"], "names"));
        assert!(has(&["vm", "run"], "image"));
        assert!(has(&["vm", "run"], "from"));
        assert!(has(&["vm", "restore"], "snapshot"));
        assert!(has(&["image", "rm"], "names"));
        assert!(has(&["kernel", "inspect"], "names"));
        assert!(
            !has(&["vm", "run"], "name"),
            "a new VM's name is the user's"
        );
        assert!(!has(&["vm", "snapshot"], "snapshot"));
    }

    #[test]
    fn positionals_keep_their_order() {
        let mut annotated = crate::cli::command();
        annotated.build();
        let mut plain = <crate::cli::Cli as clap::CommandFactory>::command();
        plain.build();
        let order = |c: &Command, path: &[&str]| -> Vec<String> {
            let mut c = c;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            c.get_positionals()
                .map(|a| a.get_id().to_string())
                .collect()
        };
        for path in [&["vm", "exec"][..], &["vm", "snapshot"], &["vm", "restore"]] {
            assert_eq!(order(&annotated, path), order(&plain, path), "{path:?}");
        }
        assert_eq!(order(&annotated, &["vm", "exec"]), ["name", "command"]);
    }
}
