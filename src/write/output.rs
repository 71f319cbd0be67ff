//! The one output-path policy of every writer, checked before any work starts:
//!
//! - the target is a regular file or a folder backlens itself wrote (it holds a
//!   [`OUTPUT_MARKER`] listing its files, and nothing else) — never a device, FIFO, socket or
//!   symbolic link, never a folder holding anything backlens did not write;
//! - an existing target is replaced only with `force`; the target is never one of the inputs, nor
//!   a folder that holds one;
//! - one run at a time per target: a lock file beside it is held from the claim to the commit, so
//!   a concurrent run fails at once with a clear message instead of racing;
//! - the bytes go to a temporary name beside the target ([`PARTIAL_MARKER`]), registered with
//!   [`crate::cleanup`] so that SIGINT/SIGTERM remove them, and are renamed into place only by
//!   [`Staged::commit`], after every check (llama.cpp's included) has passed and the file is
//!   fsynced (its write-back starts when it is finished, so the checks overlap the disk writes).

use crate::{cleanup, Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Marker in the names of temporary files, so leftovers of a killed run are recognisable.
pub const PARTIAL_MARKER: &str = ".backlens-partial-";
/// Suffix of the per-target lock file.
const LOCK_SUFFIX: &str = ".backlens-lock";
/// The file inside an output folder that lists the files backlens wrote there.
pub const OUTPUT_MARKER: &str = ".backlens-output";
/// Longest file name most Linux file systems take.
const NAME_MAX: usize = 255;

/// Whether the output is one file or a folder of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A single file (GGUF, LoRA adapter, JSON, ...).
    File,
    /// A folder backlens creates (patched safetensors checkpoint).
    Folder,
}

/// A checked output path with its lock held; [`OutputClaim::stage_file`] or
/// [`OutputClaim::stage_folder`] start the write.
#[derive(Debug)]
pub struct OutputClaim {
    target: PathBuf,
    kind: OutputKind,
    _lock: Lock,
}

fn bad(out: &Path, why: impl std::fmt::Display) -> Error {
    Error::Output {
        path: out.to_path_buf(),
        problem: why.to_string(),
    }
}

impl OutputClaim {
    /// Checks `out` against the policy above and takes its lock. `inputs` are the files and
    /// folders the run reads.
    pub fn new(out: &Path, kind: OutputKind, inputs: &[&Path], force: bool) -> Result<OutputClaim> {
        let name = match out.file_name() {
            Some(n)
                if out
                    .components()
                    .next_back()
                    .is_some_and(|c| matches!(c, std::path::Component::Normal(_))) =>
            {
                n
            }
            _ => {
                return Err(bad(
                    out,
                    "is not a file name (give a path such as out/model.gguf)",
                ))
            }
        };
        let longest = format!(".{}{PARTIAL_MARKER}{}", name.to_string_lossy(), u32::MAX);
        if longest
            .len()
            .max(format!(".{}{LOCK_SUFFIX}", name.to_string_lossy()).len())
            > NAME_MAX
        {
            return Err(bad(
                out,
                format!(
                    "the file name is too long (at most {} bytes)",
                    NAME_MAX - 30
                ),
            ));
        }
        let dir = parent_dir(out);
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad(out, format!("{} is not a folder", dir.display()))),
            Err(e) => return Err(bad(out, format!("its folder {}: {e}", dir.display()))),
        }
        let out_abs = absolute(out);
        for input in inputs {
            let input_abs = std::fs::canonicalize(input).unwrap_or_else(|_| absolute(input));
            let out_real = std::fs::canonicalize(out).unwrap_or_else(|_| out_abs.clone());
            if input_abs == out_real || absolute(input) == out_abs {
                return Err(bad(out, "is an input of this run; choose another path"));
            }
            if kind == OutputKind::Folder && input_abs.starts_with(&out_real) {
                return Err(bad(out, format!("holds the input {}", input.display())));
            }
        }
        let lock = Lock::take(&dir, name)?;
        check_existing(out, kind, force)?;
        Ok(OutputClaim {
            target: out.to_path_buf(),
            kind,
            _lock: lock,
        })
    }

    /// The target path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Starts writing the claimed file at a temporary path beside it; leftovers of earlier
    /// killed writes to the same target are removed first (the lock proves they are not live).
    pub fn stage_file(self) -> Result<AtomicOutput> {
        if self.kind != OutputKind::File {
            return Err(bad(&self.target, "was claimed as a folder"));
        }
        self.remove_leftovers();
        let temp = self.temp_path();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(&temp, e))?;
        cleanup::register_path(&temp);
        Ok(AtomicOutput {
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            staged: Staged {
                claim: Some(self),
                temp,
                unsynced: None,
            },
        })
    }

    /// Creates the temporary folder of a claimed folder output; files go in with
    /// [`StagedFolder::create_file`].
    pub fn stage_folder(self) -> Result<StagedFolder> {
        if self.kind != OutputKind::Folder {
            return Err(bad(&self.target, "was claimed as a file"));
        }
        self.remove_leftovers();
        let temp = self.temp_path();
        std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, e))?;
        cleanup::register_path(&temp);
        Ok(StagedFolder {
            files: Vec::new(),
            staged: Staged {
                claim: Some(self),
                temp,
                unsynced: None,
            },
        })
    }

    fn name(&self) -> String {
        self.target
            .file_name()
            .expect("checked in new")
            .to_string_lossy()
            .into_owned()
    }

    fn temp_path(&self) -> PathBuf {
        let name = format!(".{}{PARTIAL_MARKER}{}", self.name(), std::process::id());
        parent_dir(&self.target).join(name)
    }

    fn remove_leftovers(&self) {
        let dir = parent_dir(&self.target);
        let prefix = format!(".{}{PARTIAL_MARKER}", self.name());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name.strip_prefix(&prefix) else {
                continue;
            };
            if !pid.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_file() => {
                    let _ = std::fs::remove_file(entry.path());
                }
                Ok(t) if t.is_dir() => remove_backlens_folder(&entry.path()),
                _ => {}
            }
        }
    }
}

/// Refuses what the policy forbids at an existing `out`.
fn check_existing(out: &Path, kind: OutputKind, force: bool) -> Result<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(out, e)),
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(bad(
            out,
            "is a symbolic link; give the path it should be written to",
        ));
    }
    if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket() {
        return Err(bad(
            out,
            "is a device, FIFO or socket, not a file backlens may replace",
        ));
    }
    match (kind, ft.is_dir()) {
        (OutputKind::File, true) => return Err(bad(out, "is a folder; give a file path")),
        (OutputKind::Folder, false) => return Err(bad(out, "is a file; give a folder path")),
        (OutputKind::Folder, true) if listed_files(out).is_none() => {
            return Err(bad(
                out,
                "is a folder backlens did not write (or holds other files); choose a new path",
            ))
        }
        _ => {}
    }
    if !force {
        return Err(bad(out, "exists; pass --force to replace it"));
    }
    Ok(())
}

/// The files of a folder backlens wrote, when it holds exactly its marker and the files the
/// marker lists (all regular files); None otherwise.
fn listed_files(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(OUTPUT_MARKER)).ok()?;
    let listed: Vec<String> = text.lines().map(str::to_string).collect();
    let mut present = Vec::new();
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().ok()?.is_file() {
            return None;
        }
        if name != OUTPUT_MARKER {
            present.push(name);
        }
    }
    present.sort();
    let mut want = listed.clone();
    want.sort();
    (present == want).then_some(listed)
}

/// Removes a folder backlens wrote: its listed files, the marker, then the (empty) folder. A
/// folder that holds anything else is left as it is.
fn remove_backlens_folder(dir: &Path) {
    let files = match listed_files(dir) {
        Some(f) => f,
        // A temporary folder of a killed run may not have its marker yet: only plain files
        // named like shards and configs are ever put there, so remove those alone.
        None => return remove_partial_folder(dir),
    };
    for f in files {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_file(dir.join(OUTPUT_MARKER));
    let _ = std::fs::remove_dir(dir);
}

/// Removes a temporary folder of this tool's (named with [`PARTIAL_MARKER`]) when it holds only
/// regular files.
fn remove_partial_folder(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_file() => files.push(entry.path()),
            _ => return,
        }
    }
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(dir);
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The lock file `.NAME.backlens-lock` beside a target, held with `flock` while the claim lives
/// and removed after.
#[derive(Debug)]
struct Lock {
    path: PathBuf,
    file: File,
}

impl Lock {
    fn take(dir: &Path, name: &std::ffi::OsStr) -> Result<Lock> {
        let path = dir.join(format!(".{}{LOCK_SUFFIX}", name.to_string_lossy()));
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            // SAFETY: flock on a file descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(bad(
                    &dir.join(name),
                    "another backlens run is writing it now; wait for it to finish",
                ));
            }
            // The holder before us may have removed the file after we opened it: then the lock
            // is on an unlinked inode and another run could take a new one. Retry until the
            // locked file is the one at the path.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                cleanup::register_path(&path);
                return Ok(Lock { path, file });
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Remove while still holding the lock, so no waiter can lock a file that then vanishes
        // unnoticed (waiters re-check the inode).
        let _ = std::fs::remove_file(&self.path);
        cleanup::forget_path(&self.path);
        let _ = &self.file;
    }
}

/// A complete temporary file or folder waiting to be renamed into place. Dropping it without
/// [`Staged::commit`] removes it.
#[derive(Debug)]
pub struct Staged {
    claim: Option<OutputClaim>,
    temp: PathBuf,
    /// A finished file whose write-back to disk has been started, not yet waited for: the
    /// fsync happens in [`Staged::commit`], before the rename, so the checks between finish
    /// and commit run while the disk writes.
    unsynced: Option<File>,
}

impl Staged {
    /// The temporary path, for checks that must read the finished output before it is committed.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        self.claim.as_ref().expect("claim until commit").target()
    }

    /// Renames the temporary output into place (an existing file is replaced atomically; an
    /// existing backlens folder is moved aside, then removed).
    pub fn commit(mut self) -> Result<()> {
        if let Some(file) = self.unsynced.take() {
            file.sync_all().map_err(|e| Error::io(self.target(), e))?;
        }
        let claim = self.claim.take().expect("claim until commit");
        let target = claim.target.clone();
        let displaced = match (claim.kind, target.is_dir()) {
            (OutputKind::Folder, true) => {
                let aside = parent_dir(&target).join(format!(
                    ".{}.backlens-old-{}",
                    claim.name(),
                    std::process::id()
                ));
                std::fs::rename(&target, &aside).map_err(|e| Error::io(&target, e))?;
                Some(aside)
            }
            _ => None,
        };
        if let Err(e) = std::fs::rename(&self.temp, &target) {
            if let Some(aside) = &displaced {
                let _ = std::fs::rename(aside, &target);
            }
            self.claim = Some(claim);
            return Err(Error::io(&target, e));
        }
        cleanup::forget_path(&self.temp);
        if let Some(aside) = displaced {
            remove_backlens_folder(&aside);
        }
        if let Ok(d) = File::open(parent_dir(&target)) {
            let _ = d.sync_all();
        }
        drop(claim);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.claim.is_some() {
            match self.temp.is_dir() {
                true => remove_partial_folder(&self.temp),
                false => {
                    let _ = std::fs::remove_file(&self.temp);
                }
            }
            cleanup::forget_path(&self.temp);
        }
    }
}

/// A file being written to its temporary path; [`AtomicOutput::finish`] flushes and fsyncs it.
pub struct AtomicOutput {
    writer: Option<BufWriter<File>>,
    staged: Staged,
}

impl AtomicOutput {
    /// Claims `target` (no inputs, no replacing) and starts writing it.
    pub fn create(target: &Path) -> Result<AtomicOutput> {
        OutputClaim::new(target, OutputKind::File, &[], false)?.stage_file()
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().expect("writer present until finish");
        w.write_all(bytes)
            .map_err(|e| Error::io(self.staged.target(), e))
    }

    /// Appends `bytes`, the `bytes.len()` bytes of `src` from `offset` on, copied by the kernel
    /// (`copy_file_range`, as `cp` does: they never pass through this process's memory); where
    /// the file systems do not take such a copy, written from `bytes` instead. The file is the
    /// same either way.
    pub fn copy_range(&mut self, src: &File, offset: u64, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().expect("writer present until finish");
        let fail = |e| Error::io(self.staged.target(), e);
        w.flush().map_err(fail)?;
        let out = w.get_ref().as_raw_fd();
        let mut off_in =
            i64::try_from(offset).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        let mut done = 0;
        while done < bytes.len() {
            // SAFETY: both descriptors are open for the whole call (`src` is borrowed, `out` is
            // owned by the writer); `off_in` is a live i64 the kernel reads and advances; a null
            // output offset means the output's own file position, which the kernel advances.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    out,
                    std::ptr::null_mut(),
                    bytes.len() - done,
                    0,
                )
            };
            match n {
                1.. => done += n as usize,
                0 => {
                    return Err(fail(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the input file ended before the tensor being copied (was it truncated?)",
                    )))
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(
                            libc::EXDEV
                            | libc::EINVAL
                            | libc::ENOSYS
                            | libc::EOPNOTSUPP
                            | libc::EPERM
                            | libc::EBADF,
                        ) => return w.write_all(&bytes[done..]).map_err(fail),
                        _ => return Err(fail(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Flushes the file and starts its write-back to disk; it stays at its temporary path until
    /// committed, and [`Staged::commit`] waits for the write-back (fsync) before the rename.
    pub fn finish(mut self) -> Result<Staged> {
        let writer = self.writer.take().expect("writer present until finish");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(self.staged.target(), e.into_error()))?;
        // SAFETY: `file` is an open descriptor for the whole call. Only a hint: its result is
        // not needed, since the fsync in `commit` is what makes the file durable.
        let _ =
            unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        self.staged.unsynced = Some(file);
        Ok(self.staged)
    }

    /// [`Self::finish`], then [`Staged::commit`].
    pub fn commit(self) -> Result<()> {
        self.finish()?.commit()
    }
}

/// A folder output being filled at its temporary path.
pub struct StagedFolder {
    files: Vec<String>,
    staged: Staged,
}

impl StagedFolder {
    /// Writes one whole file into the folder (fsynced).
    pub fn write_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        if name.contains('/') || name == OUTPUT_MARKER || name.starts_with('.') && name.len() < 3 {
            return Err(bad(self.staged.target(), format!("bad file name '{name}'")));
        }
        let path = self.staged.temp.join(name);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        write().map_err(|e| Error::io(self.staged.target().join(name), e))?;
        self.files.push(name.to_string());
        Ok(())
    }

    /// Writes the marker listing the files and fsyncs the folder; it stays at its temporary
    /// path until committed.
    pub fn finish(mut self) -> Result<Staged> {
        let list = self.files.join("\n");
        let marker = self.staged.temp.join(OUTPUT_MARKER);
        std::fs::write(&marker, list).map_err(|e| Error::io(&marker, e))?;
        if let Ok(d) = File::open(&self.staged.temp) {
            let _ = d.sync_all();
        }
        self.files.clear();
        Ok(self.staged)
    }
}
