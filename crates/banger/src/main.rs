//! `banger`: the CLI, and (`banger daemon`) the daemon itself.

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

use clap::Parser;

fn main() {
    // A shell asking for completions (`COMPLETE=bash banger -- …`) is
    // answered here and nothing else runs.
    clap_complete::CompleteEnv::with_factory(cli::command).complete();
    let args: Vec<String> = std::env::args().collect();
    output::set_json_errors(&args);
    let cli = cli::Cli::parse();
    let code = match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if output::json_errors() {
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": "invalid_params", "message": format!("{e:#}")}})
                );
            }
            1
        }
    };
    std::process::exit(code);
}
