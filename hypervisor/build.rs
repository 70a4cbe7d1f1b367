fn main() {
    println!("cargo:rerun-if-changed=layout.ld");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        println!("cargo:rustc-link-arg-bins=-T{dir}/layout.ld");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    }
}
