//! `banger`: the CLI, and (`banger daemon`) the daemon itself.

/// `println!` and `print!` for results: a reader that closed early (`| head`)
/// ends the command quietly, as it ends `ls`, instead of a panic.
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}

mod cli;
mod client;
mod commands;
mod completion;
mod install_manifest;
mod interrupt;
mod output;
mod progress;
mod remote;
mod units;

use clap::FromArgMatches;

fn main() {
    // A shell asking for completions (`COMPLETE=bash banger -- …`) is
    // answered here and nothing else runs.
    clap_complete::CompleteEnv::with_factory(cli::command).complete();
    let args: Vec<String> = std::env::args().collect();
    output::set_json_errors(&args);
    // Parsed from the command as built for completion and man pages, so
    // `--help` shows what they show.
    let matches = cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| exit_parse_error(e, &args));
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let code = match commands::run(cli) {
        Ok(code) => code,
        // stdout's reader went away (`| head`): nothing is left to say.
        Err(e) if output::is_broken_pipe(&e) => output::BROKEN_PIPE_EXIT,
        Err(e) => {
            output::say_error(&e);
            1
        }
    };
    std::process::exit(code);
}

/// clap's word on a command line it cannot read, with the fix where it is
/// the usual slip: a guest command given without `--` before it.
fn exit_parse_error(e: clap::Error, args: &[String]) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let stray = match (e.kind(), e.get(ContextKind::InvalidArg)) {
        (ErrorKind::UnknownArgument, Some(ContextValue::String(arg))) => Some(arg.clone()),
        _ => None,
    };
    let runs_a_command = args
        .windows(2)
        .any(|w| w[0] == "vm" && matches!(w[1].as_str(), "exec" | "run"));
    if let Some(stray) = stray.filter(|_| runs_a_command) {
        if let Some(at) = args.iter().position(|a| *a == stray) {
            let mut fixed = args[1..at].to_vec();
            fixed.push("--".into());
            fixed.extend_from_slice(&args[at..]);
            eprintln!(
                "error: `{stray}` looks like the start of the command to run: it goes after `--`, \
                 as in `banger {}`",
                fixed.join(" ")
            );
            std::process::exit(2);
        }
    }
    e.exit()
}
