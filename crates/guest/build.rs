//! Builds the execl family (variadic, so written in C) into GuestLib.

fn main() {
    println!("cargo:rerun-if-changed=c/execl.c");
    cc::Build::new().file("c/execl.c").warnings(true).compile("netkernel_execl");
}
