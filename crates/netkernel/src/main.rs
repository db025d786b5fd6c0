//! `netkernel`: the one binary. See `netkernel --help`.

mod bench;
mod cli;
mod demo;
mod guestlib;
mod tempengine;

fn main() {
    std::process::exit(cli::main());
}
