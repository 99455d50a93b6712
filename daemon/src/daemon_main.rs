//! `mariesyncd`: the daemon, and the same command line as `mariesync`.

fn main() -> std::process::ExitCode {
    mariesync::cli::daemon_main()
}
