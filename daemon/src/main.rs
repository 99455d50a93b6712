//! `mariesync`: parses the command line and reports errors; the work is in
//! the library.
fn main() -> std::process::ExitCode {
    // Known here, not in the library: this crate alone may be linked with
    // a static C runtime (`rustc-wrapper.sh`).
    mariesync::cli::main(cfg!(target_feature = "crt-static"))
}
