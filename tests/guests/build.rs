//! Relinks the guests when their linker script changes (xtask passes it
//! with `-T`; cargo does not watch link arguments).
fn main() {
    println!("cargo:rerun-if-changed=guest.ld");
}
