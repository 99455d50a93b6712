#!/bin/sh
# Cargo's workspace wrapper (.cargo/config.toml): runs rustc as cargo asks,
# and links the `mariesync` binary (the command line, not the daemon) with a
# static C runtime on Linux with glibc.
#
# An IDE runs `mariesync touched` on every save, and scripts run the other
# commands as often. Dynamically linked, the process spent 0.8 to 0.9 ms more
# between exec and exit (3.2 against 2.4 ms, p50 of 400 runs each, in turn),
# most of it the dynamic loader's: mapping libc, libm and libgcc_s, resolving
# their symbols, and the page faults that go with them. Cargo has no flag for
# one binary of a package, hence this wrapper.
#
# The daemon (`mariesyncd`), the FFI library and every dependency stay as
# they are. Where static linking may not work (another OS, a cross build, no
# static libc installed), the binary is linked as usual. A static `mariesync`
# never looks the user up in the system's user database (cli.rs, `main`).
#
# Cargo does not rebuild when this script or what it checks changes; it does
# when the crate's sources do. `RUSTC_WORKSPACE_WRAPPER=` (empty) turns the
# wrapper off, as on Windows, where cargo cannot run a shell script.
case $1 in
# Run as the compiler itself by an outer wrapper probing it (sccache runs
# `rustc-wrapper.sh -vV`): pass the arguments to rustc.
-*) exec "${RUSTC:-rustc}" "$@" ;;
esac
rustc=$1
shift
name='' type='' target='' prev=''
for arg in "$@"; do
  case $prev in
  --crate-name) name=$arg ;;
  --crate-type) type=$arg ;;
  --target) target=$arg ;;
  esac
  prev=$arg
done
if [ "$name" = mariesync ] && [ "$type" = bin ] && [ "$(uname -s)" = Linux ]; then
  case $target in
  '' | "$(uname -m)-unknown-linux-gnu")
    # `cc` is rustc's linker; it names libc.a by its full path if it has one.
    case $(cc -print-file-name=libc.a 2>/dev/null) in
    /*) exec "$rustc" "$@" -C target-feature=+crt-static ;;
    esac
    ;;
  esac
fi
exec "$rustc" "$@"
