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
    let matches = cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let code = match commands::run(cli) {
        Ok(code) => code,
        // stdout's reader went away (`| head`): nothing is left to say.
        Err(e) if output::is_broken_pipe(&e) => output::BROKEN_PIPE_EXIT,
        Err(e) => {
            eprintln!("error: {e:#}");
            if output::json_errors() {
                outln!(
                    "{}",
                    serde_json::json!({"error": {"code": "invalid_params", "message": format!("{e:#}")}})
                );
            }
            1
        }
    };
    std::process::exit(code);
}
