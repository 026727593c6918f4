//! Atomic file writes: write a temporary file beside the target, sync it, rename it
//! over the target, sync the folder. A crash leaves either the old file or the new
//! one, never half of one.

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Whether process `pid` is running (a temporary it owns may still be written).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporaries of `path` that killed processes left (`.NAME.tmp<pid>`).
fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!(".{}.tmp", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let pid =
            n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()).filter(|&p| p > 0 && p <= i32::MAX as u32);
        if let Some(pid) = pid {
            if pid != std::process::id() && !process_alive(pid) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Writes a file atomically with `write`, which receives the temporary path.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    create_parent(path)?;
    remove_stale_temps(path);
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Makes the rename itself durable; not every platform can open a folder.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Creates the folders above `path`; a file where a folder must be is named as such
/// (the OS says only "File exists").
pub fn create_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Ok(()) };
    fs::create_dir_all(dir).map_err(|e| match dir.ancestors().find(|a| a.is_file()) {
        Some(file) => Error::file(file, None, format!("is a file, so {} cannot be created under it", path.display())),
        None => Error::io(dir, e),
    })
}

/// The folders beside a folder `dir` that [`write_dir`] uses: `.NAME.tmp` (being
/// written), `.NAME.new` (complete, about to replace it) and `.NAME.old` (the one
/// it replaces, until removed).
struct Swap {
    dir: PathBuf,
    parent: PathBuf,
    name: String,
}

impl Swap {
    fn of(dir: &Path) -> Result<Self> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::file(dir, None, "a folder written whole needs a name"))?;
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let parent = if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent };
        Ok(Self { dir: dir.to_path_buf(), parent, name })
    }

    fn beside(&self, what: &str) -> PathBuf {
        self.parent.join(format!(".{}.{what}", self.name))
    }

    fn sync_parent(&self) {
        if let Ok(d) = fs::File::open(&self.parent) {
            let _ = d.sync_all();
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        fs::rename(from, to).map_err(|e| Error::io(from, e))?;
        self.sync_parent();
        Ok(())
    }

    fn remove(path: &Path) -> Result<()> {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
            _ => Ok(()),
        }
    }

    /// Finishes a swap a crash interrupted and removes what a crash left behind:
    /// a complete `.new` replaces the folder (moving it in is the swap's last
    /// step), a partial `.tmp` and a leftover `.old` are removed, and so are the
    /// per-process temporaries of earlier versions (`.NAME.tmp<pid>`, `.NAME.old<pid>`).
    fn recover(&self) -> Result<()> {
        let new = self.beside("new");
        if new.is_dir() {
            if self.dir.exists() {
                Self::remove(&self.beside("old"))?;
                self.rename(&self.dir, &self.beside("old"))?;
            }
            self.rename(&new, &self.dir)?;
        }
        Self::remove(&self.beside("tmp"))?;
        if self.dir.exists() {
            Self::remove(&self.beside("old"))?;
        } else if self.beside("old").is_dir() {
            // Only the old checkpoint survived: it is the latest complete one.
            self.rename(&self.beside("old"), &self.dir)?;
        }
        if let Ok(entries) = fs::read_dir(&self.parent) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let stale = ["tmp", "old"].iter().any(|k| {
                    n.strip_prefix(&format!(".{}.{k}", self.name))
                        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
                });
                if stale {
                    Self::remove(&e.path())?;
                }
            }
        }
        Ok(())
    }
}

/// Writes a folder `dir` whole: `build` fills `.NAME.tmp` beside it, which is then
/// renamed to `.NAME.new` and swapped in (the old folder moved aside, then removed).
/// At every instant either `dir` or `.NAME.new` is complete, and [`recover_dir`]
/// finishes an interrupted swap; a failed `build` leaves `dir` as it was.
pub fn write_dir(dir: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let swap = Swap::of(dir)?;
    fs::create_dir_all(&swap.parent).map_err(|e| Error::io(&swap.parent, e))?;
    swap.recover()?;
    let tmp = swap.beside("tmp");
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    swap.rename(&tmp, &swap.beside("new"))?;
    swap.recover()
}

/// Completes or cleans up after a [`write_dir`] that a crash interrupted: a complete
/// `.NAME.new` replaces the folder, a lone `.NAME.old` is restored, partial and
/// stale temporaries are removed.
pub fn recover_dir(dir: &Path) -> Result<()> {
    Swap::of(dir)?.recover()
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Appends `line` and a newline to `path` (a log), creating it and its folder: all
/// of the line lands or none of it — on a failed write (a full disk) the file is
/// cut back to its length before. A partial last line that a killed process left
/// is cut off first, so that every line of the log stays parseable.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    create_parent(path)?;
    let io = |e| Error::io(path, e);
    let mut f = fs::OpenOptions::new().create(true).read(true).append(true).open(path).map_err(io)?;
    let mut len = f.metadata().map_err(io)?.len();
    if len > 0 {
        let mut last = [0u8];
        f.seek(SeekFrom::Start(len - 1)).map_err(io)?;
        f.read_exact(&mut last).map_err(io)?;
        if last[0] != b'\n' {
            let mut text = Vec::new();
            f.seek(SeekFrom::Start(0)).map_err(io)?;
            f.read_to_end(&mut text).map_err(io)?;
            len = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i as u64 + 1);
            f.set_len(len).map_err(io)?;
        }
    }
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    if let Err(e) = f.write_all(&bytes).and_then(|_| f.flush()) {
        let _ = f.set_len(len);
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_lines_stay_whole_after_a_partial_one() -> Result<()> {
        let path = std::env::temp_dir().join(format!("sidscript-append-{}", std::process::id())).join("log.jsonl");
        let _ = fs::remove_file(&path);
        append_line(&path, r#"{"it":1}"#)?;
        // A process killed in the middle of a line.
        let mut f = fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(br#"{"it":2, "loss""#).map_err(|e| Error::io(&path, e))?;
        drop(f);
        append_line(&path, r#"{"it":2}"#)?;
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        assert_eq!(text, "{\"it\":1}\n{\"it\":2}\n");
        fs::remove_dir_all(path.parent().unwrap()).ok();
        Ok(())
    }

    #[test]
    fn a_killed_writers_temporary_is_removed_a_live_ones_is_not() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("sidscript-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Beyond any pid_max: no such process. Pid 1 is always running.
        let (dead, live) = (dir.join(".grid.png.tmp2147483646"), dir.join(".grid.png.tmp1"));
        for p in [&dead, &live] {
            fs::write(p, "partial").map_err(|e| Error::io(p, e))?;
        }
        write_bytes(&dir.join("grid.png"), b"whole")?;
        assert!(!dead.exists() && live.exists());
        fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
