//! `mariesync`: parses the command line and reports errors; the work is in
//! the library.
fn main() -> std::process::ExitCode {
    mariesync::cli::main()
}
