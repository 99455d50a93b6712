//! A deterministic generator of IDE-like workspaces: source-like text files of
//! 1 to 20 KiB in directories about 25 files wide and up to 6 deep, plus
//! optional incompressible binaries (the shape of ../shared/bench's
//! gen_workspace.py, standing on its own).

use std::path::{Path, PathBuf};

pub struct Spec {
    pub files: usize,
    /// Total bytes of the text files (their sizes are scaled to fit).
    pub text_bytes: u64,
    pub binaries: usize,
    pub binary_bytes: u64,
    pub seed: u64,
}

/// SplitMix64: tiny, fast and the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

const WORDS: [&str; 24] = [
    "src", "lib", "core", "util", "api", "model", "view", "tests", "net", "io", "db", "ui",
    "config", "parser", "server", "client", "cache", "auth", "sync", "index", "store", "codec",
    "engine", "event",
];
const IDENTS: [&str; 20] = [
    "value", "result", "buffer", "index", "count", "config", "handler", "request", "response",
    "state", "node", "path", "offset", "length", "error", "token", "cursor", "entry", "chunk",
    "digest",
];
const EXTENSIONS: [&str; 8] = ["rs", "ts", "py", "go", "java", "c", "md", "json"];

/// About `len` bytes of source-like text.
pub fn source_text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    while out.len() < len {
        let indent = rng.below(5) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        let a = IDENTS[rng.below(20) as usize];
        let b = IDENTS[rng.below(20) as usize];
        let c = IDENTS[rng.below(20) as usize];
        let line = match rng.below(6) {
            0 => format!("let {a} = {b}.{c}({});\n", rng.below(100_000)),
            1 => format!("if {a} == {b} {{\n"),
            2 => format!("return {a}.{c}({b});\n"),
            3 => format!("// TODO({a}): handle {b} when {c} is empty\n"),
            4 => format!("for {a} in {b}.iter() {{ {c} += {}; }}\n", rng.below(999)),
            _ => format!("fn {a}_{c}({b}: usize) -> Result<(), Error> {{\n"),
        };
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

/// The relative path and size of every text file, without writing anything.
pub fn plan(spec: &Spec) -> Vec<(PathBuf, usize)> {
    let mut rng = Rng::new(spec.seed);
    let mut sizes: Vec<u64> = (0..spec.files)
        .map(|_| 1024 + rng.below(19 * 1024))
        .collect();
    let total: u64 = sizes.iter().sum();
    if total > 0 && spec.text_bytes > 0 {
        for size in &mut sizes {
            *size = (*size as u128 * spec.text_bytes as u128 / total as u128).max(1) as u64;
        }
    }
    let mut dirs = vec![PathBuf::from("src")];
    let mut out = Vec::with_capacity(spec.files);
    for (i, size) in sizes.into_iter().enumerate() {
        if i % 25 == 0 && i > 0 {
            // A new directory below a random existing one, at most 6 deep.
            let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
            let parent = if parent.components().count() >= 6 {
                PathBuf::from("src")
            } else {
                parent
            };
            dirs.push(parent.join(format!("{}{}", WORDS[rng.below(24) as usize], i / 25)));
        }
        let dir = dirs.last().expect("one directory at least");
        let ext = EXTENSIONS[rng.below(8) as usize];
        out.push((
            dir.join(format!("{}_{i}.{ext}", IDENTS[rng.below(20) as usize])),
            size as usize,
        ));
    }
    out
}

/// Writes the workspace under `root` using `threads` writers.
pub fn generate(root: &Path, spec: &Spec, threads: usize) -> std::io::Result<u64> {
    let files = plan(spec);
    let threads = threads.max(1);
    let written = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| -> std::io::Result<()> {
        let mut handles = Vec::new();
        for t in 0..threads {
            let files = &files;
            let written = &written;
            handles.push(scope.spawn(move || -> std::io::Result<()> {
                for (i, (path, size)) in files.iter().enumerate().skip(t).step_by(threads) {
                    let mut rng =
                        Rng::new(spec.seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
                    let full = root.join(path);
                    std::fs::create_dir_all(full.parent().expect("files have parents"))?;
                    std::fs::write(&full, source_text(&mut rng, *size))?;
                    written.fetch_add(*size as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        for handle in handles {
            handle.join().expect("generator thread")?;
        }
        Ok(())
    })?;
    if spec.binaries > 0 {
        std::fs::create_dir_all(root.join("large"))?;
    }
    let mut rng = Rng::new(spec.seed.wrapping_add(1));
    for i in 0..spec.binaries {
        let mut data = vec![0u8; spec.binary_bytes as usize];
        rng.fill(&mut data);
        std::fs::write(root.join(format!("large/blob{i}.bin")), &data)?;
        written.fetch_add(spec.binary_bytes, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(written.into_inner())
}

/// Parses "1GiB", "64MiB", "500KiB", "123" into bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len()),
    );
    let value: f64 = number.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((value * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_deterministic_and_sized() {
        let spec = Spec {
            files: 1000,
            text_bytes: 10 << 20,
            binaries: 0,
            binary_bytes: 0,
            seed: 7,
        };
        let a = plan(&spec);
        assert_eq!(a, plan(&spec));
        let total: usize = a.iter().map(|(_, s)| s).sum();
        assert!((total as i64 - (10 << 20)).abs() < 2000, "{total}");
        assert!(a.iter().all(|(p, _)| p.components().count() <= 7));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
    }
}
