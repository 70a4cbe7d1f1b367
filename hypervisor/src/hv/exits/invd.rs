//! INVD: carried out as WBINVD, which never loses data.

use super::skip_instruction;
use crate::arch::x86::instr;

pub fn handle() {
    // SAFETY: writing back caches is always safe.
    unsafe { instr::wbinvd() };
    skip_instruction();
}
