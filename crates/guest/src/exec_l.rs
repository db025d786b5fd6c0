//! The execl family, exported. They are variadic, which stable Rust cannot define, so the work
//! is done in C (c/execl.c); each export here is a naked jump to it, which leaves the caller's
//! registers and stack, and so the variadic arguments, as they were.

extern "C" {
    fn nk_execl();
    fn nk_execlp();
    fn nk_execle();
}

/// Interposes execl(3).
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execl() {
    core::arch::naked_asm!("jmp {}", sym nk_execl)
}

/// Interposes execlp(3).
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execlp() {
    core::arch::naked_asm!("jmp {}", sym nk_execlp)
}

/// Interposes execle(3).
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execle() {
    core::arch::naked_asm!("jmp {}", sym nk_execle)
}
