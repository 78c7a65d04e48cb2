//! `banger`: the CLI, and (`banger daemon`) the daemon itself.

mod cli;
mod client;
mod commands;
mod interrupt;
mod output;
mod progress;
mod units;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
