//! Writing output files safely: all or nothing, never over an existing file without `--force`,
//! private keys created with mode 0600.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::RuntimeFailure;

/// A set of files to write together.
#[derive(Default)]
pub struct Outputs {
    files: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl Outputs {
    /// Adds a public file (mode 0644).
    pub fn public(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.files.push((path.into(), contents.into(), 0o644));
    }

    /// Adds a secret file (mode 0600): private keys, passwords.
    pub fn secret(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.files.push((path.into(), contents.into(), 0o600));
    }

    /// Refuses to go on if any output exists and `force` is not set.
    pub fn check_absent(&self, force: bool) -> Result<()> {
        if force {
            return Ok(());
        }
        for (path, _, _) in &self.files {
            if path.exists() {
                bail!(
                    "{} already exists; choose another --out or pass --force to overwrite it",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Writes every file, or none: each goes to a temporary file beside its target first, and the
    /// temporaries are renamed into place only when all of them were written.
    pub fn write(self, force: bool) -> Result<Vec<PathBuf>> {
        self.check_absent(force)?;
        let mut temps: Vec<(PathBuf, PathBuf)> = Vec::new();
        let result = (|| -> Result<()> {
            for (path, contents, mode) in &self.files {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir).map_err(|e| {
                        runtime(format!("creating directory {}: {e}", dir.display()))
                    })?;
                }
                let temp = temp_path(path);
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*mode)
                    .open(&temp)
                    .map_err(|e| runtime(format!("writing {}: {e}", path.display())))?;
                temps.push((temp.clone(), path.clone()));
                file.write_all(contents)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| runtime(format!("writing {}: {e}", path.display())))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (temp, _) in &temps {
                let _ = fs::remove_file(temp);
            }
            return Err(e);
        }
        let mut done = Vec::new();
        for (temp, path) in &temps {
            if let Err(e) = fs::rename(temp, path) {
                for (t, _) in &temps {
                    let _ = fs::remove_file(t);
                }
                if !force {
                    for p in &done {
                        let _ = fs::remove_file(p);
                    }
                }
                return Err(runtime(format!(
                    "moving {} into place: {e}",
                    path.display()
                )));
            }
            done.push(path.clone());
        }
        Ok(done)
    }
}

fn runtime(message: String) -> anyhow::Error {
    anyhow::Error::new(RuntimeFailure(message))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads an input file, naming it in the error.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}
