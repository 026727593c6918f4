//! The toy world's teacher and judge (models/toy) travel inside the binary, so that
//! the main job runs right after `cargo install` in an empty folder: on first use
//! they are unpacked into a cache folder named by their content hash, and every
//! loader then reads that diffusers folder as it reads any other.

use crate::error::{Error, Result};
use include_dir::{include_dir, Dir};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

static TOY_MODEL: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/models/toy");

/// Where the toy pipeline is read from in a checkout (and where the toy world's
/// training scripts write it).
pub const CHECKOUT_DIR: &str = "models/toy";

/// The cache root: `SIDSCRIPT_CACHE`, else `$XDG_CACHE_HOME/sidscript`, else
/// `~/.cache/sidscript`, else a folder in the system's temporary directory.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("SIDSCRIPT_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("sidscript")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("sidscript")))
        .unwrap_or_else(|| std::env::temp_dir().join("sidscript-cache"))
}

fn files() -> Vec<&'static include_dir::File<'static>> {
    fn walk(d: &'static Dir<'static>, out: &mut Vec<&'static include_dir::File<'static>>) {
        out.extend(d.files());
        for sub in d.dirs() {
            walk(sub, out);
        }
    }
    let mut v = vec![];
    walk(&TOY_MODEL, &mut v);
    v.sort_by_key(|f| f.path());
    v
}

/// The first 12 hex digits of the SHA-256 of the embedded files (names and bytes).
fn fingerprint() -> &'static str {
    static FP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FP.get_or_init(|| {
        let mut h = Sha256::new();
        for f in files() {
            h.update(f.path().to_string_lossy().as_bytes());
            h.update((f.contents().len() as u64).to_le_bytes());
            h.update(f.contents());
        }
        h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
    })
}

/// The toy pipeline folder: `models/toy` when the working folder has one (a
/// checkout, or a toy world trained here), else the embedded copy, unpacked once
/// into the cache (a temporary folder first, renamed into place, so that a run
/// stopped half-way or two runs at once never leave a partial folder).
pub fn toy_model_dir() -> Result<PathBuf> {
    if Path::new(CHECKOUT_DIR).join("unet").join("config.json").is_file() {
        return Ok(PathBuf::from(CHECKOUT_DIR));
    }
    let root = cache_root();
    let fp = fingerprint();
    let dir = root.join(format!("toy-{fp}"));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".toy-{fp}-{}", std::process::id()));
    let io = |p: &Path, e: std::io::Error| Error::file(p, None, format!("unpacking the bundled toy world: {e}"));
    for f in files() {
        let target = tmp.join(f.path());
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&target, f.contents()).map_err(|e| io(&target, e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => eprintln!("toy world: the bundled teacher and judge unpacked into {}", dir.display()),
        // Another process unpacked it first: theirs stands.
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(io(&dir, e)),
    }
    Ok(dir)
}
