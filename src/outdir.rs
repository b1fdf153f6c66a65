//! What lorafit will and will not touch: every folder a command writes is *claimed* first.
//!
//! - **Lock.** The folder is locked with an OS advisory lock (`flock` on `<dir>/.lorafit.lock`,
//!   released by the kernel when the process ends, however it ends). A second lorafit writing
//!   into the same folder fails at once, naming the process that holds it.
//! - **Marker.** Every output folder lorafit creates holds `.lorafit` (JSON: what wrote it, and
//!   for merges the files written). `--force` replaces only a folder with that marker (or an
//!   empty one), and within it only what lorafit wrote; anything else is refused, never deleted.
//! - **Inputs.** `--out` equal to, or containing, one of the command's inputs (model, adapters,
//!   data) is refused, `--force` or not.
//! - **Temp files.** Crash-safe writes go through `.NAME.tmp-PID` files and folders (and merges
//!   through `.NAME.merge-tmp-PID`); those left by a killed process (PID gone) are removed when
//!   the next run claims the folder.
//! - A folder created by a claim that fails before anything is written is removed again.
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::bail_kind;
use crate::error::Kind;

/// The marker file in every output folder lorafit creates.
pub const MARKER: &str = ".lorafit";
/// The lock file (held with `flock` while a command writes the folder).
pub const LOCK: &str = ".lorafit.lock";

/// The marker's content.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Marker {
    /// lorafit's version that wrote the folder.
    pub lorafit: String,
    /// What the folder holds: `sft`, `rm`, `ppo`, `dpo`, `grpo` (a training run and its adapter),
    /// `pipeline`, `merge`, ...
    pub kind: String,
    /// Files lorafit wrote there (relative names), when the writer records them (merge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// The families of kinds: a `--force` may replace one kind of output with another of the same family.
pub fn family(kind: &str) -> &str {
    match kind {
        "sft" | "rm" | "ppo" | "dpo" | "grpo" | "run" => "run",
        other => other,
    }
}

/// A folder claimed for writing: locked until this value is dropped.
#[derive(Debug)]
pub struct OutDir {
    pub path: PathBuf,
    lock: Option<File>,
    /// The claim created the folder (so a failed command can remove it again).
    created: bool,
}

impl OutDir {
    /// Creates `dir` if needed and takes its lock; removes temp files that killed runs left.
    /// Fails at once (kind [`Kind::OutputLocked`]) when another process holds the lock.
    pub fn lock(dir: &Path) -> Result<Self> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create output folder {}", dir.display()))?;
        if !dir.is_dir() {
            anyhow::bail!("{} exists and is not a folder", dir.display())
        }
        let lock_path = dir.join(LOCK);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open the lock file {}", lock_path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { "another lorafit process".to_string() } else { holder.replace('\n', ", ") };
                bail_kind!(Kind::OutputLocked, "{} is being written by {who} (lock {} is held)", dir.display(), lock_path.display())
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        // Name this process in the lock file, for the message of a second run.
        let args: Vec<String> = std::env::args().collect();
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "pid {}\ncommand {}\n", std::process::id(), args.join(" "));
        let _ = f.flush();
        let out = Self { path: dir.to_path_buf(), lock: Some(f), created };
        remove_stale_temps(dir);
        Ok(out)
    }

    /// The marker, if lorafit wrote this folder.
    pub fn marker(&self) -> Option<Marker> {
        read_marker(&self.path)
    }

    /// Writes (or rewrites) the marker.
    pub fn write_marker(&self, kind: &str, files: &[String]) -> Result<()> {
        let m = Marker { lorafit: env!("CARGO_PKG_VERSION").into(), kind: kind.into(), files: files.to_vec() };
        crate::io::atomic_write(&self.path.join(MARKER), serde_json::to_string_pretty(&m)?.as_bytes())
    }

    /// Entries of the folder other than the lock and the marker.
    pub fn contents(&self) -> Result<Vec<String>> {
        let mut v = vec![];
        for e in std::fs::read_dir(&self.path).with_context(|| format!("cannot list {}", self.path.display()))? {
            let n = e?.file_name().to_string_lossy().to_string();
            if n != LOCK && n != MARKER {
                v.push(n);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Checks that this folder may receive output of `kind`, replacing lorafit's earlier output
    /// there: it is empty, or lorafit wrote it (marker) as output of the same family of kinds.
    /// A folder with other content and no marker is refused (kind [`Kind::NotLorafitOutput`]);
    /// nothing is removed here.
    pub fn check_replaceable(&self, kind: &str) -> Result<()> {
        let contents = self.contents()?;
        if contents.is_empty() {
            return Ok(());
        }
        match self.marker() {
            Some(m) if family(&m.kind) == family(kind) => Ok(()),
            Some(m) => bail_kind!(
                Kind::NotLorafitOutput,
                "{} holds lorafit {} output, not {kind} output: refusing to replace it",
                self.path.display(),
                m.kind
            ),
            None => bail_kind!(
                Kind::NotLorafitOutput,
                "{} was not written by lorafit (it has no {MARKER} marker and holds {}): refusing to replace it",
                self.path.display(),
                preview(&contents)
            ),
        }
    }
}

impl Drop for OutDir {
    /// Unlocks; a folder this claim created that received nothing is removed again.
    fn drop(&mut self) {
        let unused = self.created && self.contents().map(|c| c.is_empty()).unwrap_or(false);
        drop(self.lock.take());
        if unused {
            let _ = std::fs::remove_file(self.path.join(MARKER));
            let _ = std::fs::remove_file(self.path.join(LOCK));
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

fn preview(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    let more = if names.len() > 3 { format!(" and {} more", names.len() - 3) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

/// The marker of `dir`, if it has a readable one.
pub fn read_marker(dir: &Path) -> Option<Marker> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(MARKER)).ok()?).ok()
}

/// An absolute, normalised form of `p` (symlinks resolved as far as the path exists).
fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
    // Resolve the longest existing ancestor, then append the rest.
    let mut rest = vec![];
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses an `out` (flag `--out` or a config key) that is, or contains, one of `inputs`
/// (each named by its flag). Inputs that are not local paths (hub ids) are skipped.
pub fn check_not_input(out: &Path, out_flag: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = absolute(out);
    for (flag, input) in inputs {
        if input.as_os_str().is_empty() || !input.exists() {
            continue;
        }
        let i = absolute(input);
        if i == o {
            bail_kind!(Kind::OutputIsInput, "{out_flag} {} is the same folder as {flag} {}: writing there would destroy it", out.display(), input.display())
        }
        if i.starts_with(&o) {
            bail_kind!(Kind::OutputIsInput, "{out_flag} {} contains {flag} {}: writing there could destroy it", out.display(), input.display())
        }
    }
    Ok(())
}

/// Whether process `pid` is running.
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // kill(pid, 0) probes without signalling: EPERM means it exists (another user's).
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The PID of a lorafit temp name (`.NAME.tmp-PID`, `.NAME.merge-tmp-PID`, `.NAME.merge-old-PID`).
pub fn temp_owner(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    for tag in [".tmp-", ".merge-tmp-", ".merge-old-"] {
        if let Some(i) = name.rfind(tag) {
            return name[i + tag.len()..].parse().ok();
        }
    }
    None
}

/// Removes the temp files and folders in `dir` (and its `checkpoints/`) whose owner process is
/// gone. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let mut n = 0;
    for d in [dir.to_path_buf(), dir.join("checkpoints")] {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = temp_owner(&name) {
                if !alive(pid) {
                    let p = e.path();
                    let ok = if p.is_dir() { std::fs::remove_dir_all(&p).is_ok() } else { std::fs::remove_file(&p).is_ok() };
                    if ok {
                        tracing::info!("removed {} (left by a run that was killed)", p.display());
                        n += 1;
                    }
                }
            }
        }
    }
    n
}

/// Removes stale merge temps of `leaf` in `parent` (`.LEAF.merge-tmp-PID`), left by killed merges.
pub fn remove_stale_siblings(parent: &Path, leaf: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(parent) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(&format!(".{leaf}.")) {
            continue;
        }
        if let Some(pid) = temp_owner(&name) {
            if !alive(pid) && std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path())).is_ok() {
                tracing::info!("removed {} (left by a merge that was killed)", e.path().display());
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(temp_owner(".adapter_model.safetensors.tmp-123"), Some(123));
        assert_eq!(temp_owner(".step-00000002.tmp-77"), Some(77));
        assert_eq!(temp_owner(".merged.merge-tmp-9"), Some(9));
        assert_eq!(temp_owner("adapter.tmp-9"), None);
        assert_eq!(temp_owner(".x.tmp-abc"), None);
    }

    #[test]
    fn lock_is_exclusive_and_unused_folder_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("out");
        let a = OutDir::lock(&d).unwrap();
        let e = OutDir::lock(&d).unwrap_err();
        assert_eq!(crate::error::kind_of(&e), Some(Kind::OutputLocked));
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        assert!(!d.exists(), "an unused folder the claim created is removed");
        let a = OutDir::lock(&d).unwrap();
        std::fs::write(d.join("x"), "1").unwrap();
        drop(a);
        assert!(d.join("x").exists());
    }

    #[test]
    fn replace_needs_marker() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("thesis.tex"), "x").unwrap();
        let o = OutDir::lock(t.path()).unwrap();
        let e = o.check_replaceable("merge").unwrap_err();
        assert_eq!(crate::error::kind_of(&e), Some(Kind::NotLorafitOutput));
        o.write_marker("sft", &[]).unwrap();
        assert!(o.check_replaceable("rm").is_ok());
        assert!(o.check_replaceable("merge").is_err());
    }

    #[test]
    fn out_must_not_hold_inputs() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("m");
        std::fs::create_dir_all(m.join("adapter")).unwrap();
        assert!(check_not_input(&m, "--out", &[("--model", &m)]).is_err());
        assert!(check_not_input(t.path(), "--out", &[("--adapter", &m.join("adapter"))]).is_err());
        assert!(check_not_input(&m.join("merged"), "--out", &[("--model", &m)]).is_ok());
        assert!(check_not_input(&m.join("./"), "--out", &[("--model", &m)]).is_err());
    }
}
