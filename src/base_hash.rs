//! The sha256 of a base file that provenance records, cached per file under the user's cache
//! folder so that repeated edits of one base do not read all of it again.
//!
//! An entry is keyed by the file's identity as the open descriptor reports it (device, inode,
//! size, modification and change times in nanoseconds) and is trusted only when all five are
//! equal. Like git's racy-entry rule, an entry is written only when both times are older than
//! the moment the hash started by [`RACY_MARGIN`] (file-system clocks are coarse), and only when
//! the identity did not change while hashing: a write after the hash moves the change time past
//! the recorded one, so it never matches. An unreadable or malformed entry is ignored and
//! rewritten; a failed write only costs a hash next time.

use crate::weights::gguf::GgufFile;
use crate::write::{OutputClaim, OutputKind};
use crate::{Error, Result};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much older than the hash's start a file's times must be for its entry to be written.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);

/// First line of every entry (format name and version).
const MAGIC: &str = "backlens-sha256 1";
/// Longest entry read: the three lines with the widest numbers fit well within it.
const MAX_ENTRY: u64 = 256;

/// Where the hash came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashSource {
    /// Read from the file's entry.
    Cached,
    /// Computed from the file's bytes; `written` when the entry was (re)written.
    Computed {
        /// Whether an entry now holds the hash.
        written: bool,
    },
}

/// The identity an entry is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Identity {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns
        )
    }

    /// Whether both times are older than `started` by [`RACY_MARGIN`].
    fn settled_before(&self, started: SystemTime) -> bool {
        let Ok(since) = started.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let limit = since.as_nanos() as i128 - RACY_MARGIN.as_nanos() as i128;
        self.mtime_ns <= limit && self.ctime_ns <= limit
    }
}

/// The default cache folder: `$XDG_CACHE_HOME/backlens/sha256` when that is an absolute path,
/// else `$HOME/.cache/backlens/sha256`.
pub fn default_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let root = xdg.or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(root.join("backlens/sha256"))
}

/// The hex sha256 of `g`'s file, through the default cache folder.
pub fn base_sha256(g: &GgufFile) -> String {
    base_sha256_in(g, default_dir().as_deref()).0
}

/// The hex sha256 of `g`'s file and where it came from, with entries in `dir` (None: no cache;
/// a GGUF held in memory is always hashed).
pub fn base_sha256_in(g: &GgufFile, dir: Option<&Path>) -> (String, HashSource) {
    let identity = g
        .opened_file()
        .and_then(|f| f.metadata().ok())
        .map(|m| Identity::of(&m));
    let known = dir.zip(identity).map(|(d, id)| (entry_path(d, &id), id));
    if let Some((path, id)) = &known {
        if let Some(hex) = read_entry(path, id) {
            return (hex, HashSource::Cached);
        }
    }
    let started = SystemTime::now();
    let hex = g.sha256_hex();
    let unchanged = |id: &Identity| {
        g.opened_file()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| Identity::of(&m) == *id)
    };
    let written = known.is_some_and(|(path, id)| {
        id.settled_before(started) && unchanged(&id) && write_entry(&path, &id, &hex).is_ok()
    });
    (hex, HashSource::Computed { written })
}

/// Removes the entry of `g`'s file from `dir`, if there is one (`bench` times a cold hash).
pub fn forget(g: &GgufFile, dir: &Path) -> Result<()> {
    let Some(m) = g.opened_file().and_then(|f| f.metadata().ok()) else {
        return Ok(());
    };
    let path = entry_path(dir, &Identity::of(&m));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
        _ => Ok(()),
    }
}

fn entry_path(dir: &Path, id: &Identity) -> PathBuf {
    dir.join(format!("{:x}-{:x}.sha256", id.dev, id.ino))
}

fn entry_text(id: &Identity, hex: &str) -> String {
    format!("{MAGIC}\n{}\n{hex}\n", id.line())
}

/// The hash an entry holds for exactly `id`, or None when the entry is missing, unreadable,
/// malformed or for another identity.
fn read_entry(path: &Path, id: &Identity) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_ENTRY)
        .read_to_string(&mut text)
        .ok()?;
    let hex = text.lines().nth(2)?;
    let well_formed = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (well_formed && text == entry_text(id, hex)).then(|| hex.to_string())
}

fn write_entry(path: &Path, id: &Identity, hex: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = OutputClaim::new(path, OutputKind::File, &[], true)?.stage_file()?;
    out.write_all(entry_text(id, hex).as_bytes())?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(mtime_ns: i128, ctime_ns: i128) -> Identity {
        Identity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns,
        }
    }

    /// A GGUF with no tensors and one string key: `value` changes its bytes, not its size.
    fn gguf(value: &str) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(8u32.to_le_bytes());
        b.extend((value.len() as u64).to_le_bytes());
        b.extend(value.as_bytes());
        b
    }

    #[test]
    fn a_touched_or_changed_file_is_hashed_again() {
        let dir = std::env::temp_dir().join(format!("backlens-hash-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, cache) = (dir.join("base.gguf"), dir.join("cache"));
        let (a, b) = (gguf("aaaa"), gguf("bbbb"));
        std::fs::write(&base, &a).unwrap();
        let first_mtime = std::fs::metadata(&base).unwrap().modified().unwrap();
        // Older than any hash from now on by the margin: the first hash writes its entry.
        std::thread::sleep(RACY_MARGIN + Duration::from_millis(300));
        let hash_of = |bytes: &[u8]| crate::write::sha256_hex(bytes);
        let open = || GgufFile::open(&base).unwrap();
        let computed = |written| HashSource::Computed { written };
        assert_eq!(
            base_sha256_in(&open(), Some(&cache)),
            (hash_of(&a), computed(true))
        );
        assert_eq!(
            base_sha256_in(&open(), Some(&cache)),
            (hash_of(&a), HashSource::Cached)
        );
        assert_eq!(
            base_sha256_in(&open(), None),
            (hash_of(&a), computed(false))
        );
        // Touched: same bytes, same size, a new mtime. Racy now, so no entry is written.
        let touch = |t: SystemTime| {
            let f = std::fs::File::options().write(true).open(&base).unwrap();
            f.set_modified(t).unwrap();
        };
        touch(SystemTime::now());
        assert_eq!(
            base_sha256_in(&open(), Some(&cache)),
            (hash_of(&a), computed(false))
        );
        // Other bytes of the same size with the first mtime put back: the change time differs.
        std::fs::write(&base, &b).unwrap();
        touch(first_mtime);
        let m = std::fs::metadata(&base).unwrap();
        assert_eq!(
            (m.len(), m.modified().unwrap()),
            (a.len() as u64, first_mtime)
        );
        let (hex, source) = base_sha256_in(&open(), Some(&cache));
        assert_ne!(hex, hash_of(&a));
        assert_eq!((hex, source), (hash_of(&b), computed(false)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn racy_times_are_not_settled() {
        let started = UNIX_EPOCH + Duration::from_secs(100);
        let margin = RACY_MARGIN.as_nanos() as i128;
        let at = 100_000_000_000 - margin;
        assert!(id(at, at).settled_before(started));
        assert!(!id(at + 1, at).settled_before(started));
        assert!(!id(at, at + 1).settled_before(started));
        assert!(!id(at, 200_000_000_000).settled_before(started));
    }

    #[test]
    fn entries_round_trip_and_refuse_anything_else() {
        let dir = std::env::temp_dir().join(format!("backlens-hash-unit-{}", std::process::id()));
        let (a, hex) = (id(5, 6), "0123456789abcdef".repeat(4));
        let path = entry_path(&dir, &a);
        write_entry(&path, &a, &hex).unwrap();
        assert_eq!(read_entry(&path, &a).as_deref(), Some(hex.as_str()));
        assert_eq!(read_entry(&path, &id(5, 7)), None);
        let bad = [
            entry_text(&a, &hex.to_uppercase()),
            entry_text(&a, &hex[..63]),
            entry_text(&a, &hex).replace(MAGIC, "backlens-sha256 2"),
            format!("{}extra\n", entry_text(&a, &hex)),
            String::new(),
        ];
        for text in bad {
            std::fs::write(&path, &text).unwrap();
            assert_eq!(read_entry(&path, &a), None, "{text:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
