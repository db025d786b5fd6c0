#[derive(clap::Args)]
pub struct Args {}
#[derive(clap::Args)]
pub struct PeerArgs {}
pub fn main(_a: Args) -> i32 {
    0
}
pub fn peer(_a: PeerArgs) -> i32 {
    0
}
