//! The device's long-lived key pair. Its libp2p PeerId is the device ID.

use std::path::Path;

use libp2p::identity::Keypair;

pub struct Identity {
    pub keypair: Keypair,
    pub device_id: String,
}

/// Loads the key at `path`, or creates one (mode 0600) on first start.
pub fn load_or_create(path: &Path) -> anyhow::Result<Identity> {
    let keypair = match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| anyhow::anyhow!("device key {} is unreadable: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding()?;
            write_private(path, &bytes)?;
            keypair
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot read device key {}: {e}",
                path.display()
            ));
        }
    };
    let device_id = keypair.public().to_peer_id().to_string();
    Ok(Identity { keypair, device_id })
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    Ok(())
}
