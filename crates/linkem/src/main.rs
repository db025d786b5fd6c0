//! `linkem --a TAP --b TAP [--delay D] [--rate R] [--loss P] [--limit BYTES] [--seed N]`
//! (also `netkernel linkem`).

use clap::Parser;

#[derive(Parser)]
#[command(name = "linkem", version, about = "A link emulator between two TAP devices: delay, rate, loss, queue")]
struct Cli {
    #[command(flatten)]
    args: linkem::Args,
}

fn main() {
    std::process::exit(linkem::main(Cli::parse().args));
}
