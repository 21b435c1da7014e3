//! Secrets kept in files: 256-bit keys as hex (the URL-signing key, the MQTT credentials key)
//! and the admin token, written once with mode 0600 and synced. Every subsystem that keeps a
//! secret in the data directory (or, for several replicas, in a file they share) reads and
//! creates it here.

use std::path::Path;

/// Reads a hex key of at least 32 bytes; `None` if the file does not exist.
pub fn read_key(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => hex::decode(text.trim())
            .ok()
            .filter(|k| k.len() >= 32)
            .map(Some)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a hex key of at least 32 bytes", path.display()),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the key at `path`, creating a random 256-bit one (mode 0600) if missing.
pub fn load_or_create_key(path: &Path) -> std::io::Result<Vec<u8>> {
    if let Some(k) = read_key(path)? {
        return Ok(k);
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(std::io::Error::other)?;
    match write_private(path, &hex::encode(key)) {
        Ok(()) => {}
        // Another process sharing the file (a replica starting beside this one) was first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Some(k) = read_key(path)? {
                return Ok(k);
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    tracing::info!(path = %path.display(), "created a key");
    Ok(key.to_vec())
}

/// Writes `text` to a new file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
