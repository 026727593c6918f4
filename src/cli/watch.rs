//! Watching a script and the modules it imports for saves (`run --watch`).
//!
//! The folders are watched rather than the files, so that editors that save by
//! writing a new file and renaming it over the old one are seen too. A change
//! counts once the writes have settled (debounced) and the content differs from
//! the version loaded last, so touching a file without changing it reloads nothing.

use notify::{RecursiveMode, Watcher};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const SETTLE: Duration = Duration::from_millis(150);

pub struct Watch {
    watcher: notify::RecommendedWatcher,
    events: Receiver<PathBuf>,
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    fingerprint: u64,
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| std::env::current_dir().map(|d| d.join(p)).unwrap_or(p.to_path_buf()))
}

impl Watch {
    pub fn new(files: &[PathBuf]) -> anyhow::Result<Self> {
        let (tx, events) = channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
        })?;
        let mut w = Self { watcher, events, files: BTreeSet::new(), dirs: BTreeSet::new(), fingerprint: 0 };
        w.set_files(files)?;
        w.fingerprint = w.content_fingerprint();
        Ok(w)
    }

    /// The files to watch (the script and every module file it imported).
    pub fn set_files(&mut self, files: &[PathBuf]) -> anyhow::Result<()> {
        self.files = files.iter().map(|f| absolute(f)).collect();
        for f in &self.files {
            if let Some(dir) = f.parent() {
                if self.dirs.insert(dir.to_path_buf()) {
                    self.watcher.watch(dir, RecursiveMode::NonRecursive)?;
                }
            }
        }
        Ok(())
    }

    fn content_fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for f in &self.files {
            f.hash(&mut h);
            std::fs::read(f).unwrap_or_default().hash(&mut h);
        }
        h.finish()
    }

    fn drain_relevant(&self) -> bool {
        let mut any = false;
        while let Ok(p) = self.events.try_recv() {
            any |= self.files.contains(&absolute(&p))
                || p.file_name().is_some_and(|n| self.files.iter().any(|f| f.file_name() == Some(n)));
        }
        any
    }

    /// Whether a watched file was saved with new content since the last call that
    /// returned true; waits for the writes to settle first.
    pub fn changed(&mut self) -> bool {
        if !self.drain_relevant() {
            return false;
        }
        loop {
            std::thread::sleep(SETTLE);
            if !self.drain_relevant() {
                break;
            }
        }
        let now = self.content_fingerprint();
        if now == self.fingerprint {
            return false;
        }
        self.fingerprint = now;
        true
    }
}
