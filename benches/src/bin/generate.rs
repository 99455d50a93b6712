//! `gen DIR [--files N] [--bytes SIZE] [--binaries N --binary-bytes SIZE] [--seed S]`:
//! writes a deterministic IDE-like workspace.
use mariesync_benches::args::Args;
use mariesync_benches::workspace_gen::{self as workspace_gen, Spec};

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let dir = args.first().ok_or_else(|| anyhow::anyhow!("usage: gen DIR [--files N] [--bytes SIZE] [--binaries N] [--binary-bytes SIZE] [--seed S]"))?;
    let flag = |name: &str| args.value(name).map(str::to_owned);
    let spec = Spec {
        files: flag("--files")
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(5000),
        text_bytes: flag("--bytes")
            .and_then(|v| workspace_gen::parse_bytes(&v))
            .unwrap_or(50 << 20),
        binaries: flag("--binaries")
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(0),
        binary_bytes: flag("--binary-bytes")
            .and_then(|v| workspace_gen::parse_bytes(&v))
            .unwrap_or(64 << 20),
        seed: flag("--seed").map(|v| v.parse()).transpose()?.unwrap_or(42),
    };
    let started = std::time::Instant::now();
    let bytes = workspace_gen::generate(std::path::Path::new(dir), &spec, 4)?;
    eprintln!(
        "wrote {} files, {bytes} bytes in {:.1?}",
        spec.files + spec.binaries,
        started.elapsed()
    );
    Ok(())
}
