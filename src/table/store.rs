//! Where table partitions live between runs of a worker.
//!
//! Every table keeps its partitions in memory while the worker runs; the changelog topic is the
//! durable copy. A [`Store`] adds a local copy on disk, so a restarted worker reads its state
//! from the disk and replays only the part of the changelog written since:
//!
//! - `memory://` (the default): nothing is kept; a worker taking a partition replays its whole
//!   changelog.
//! - `fjall://PATH`: a persistent LSM store (fjall) in `PATH/<app id>`. Each commit writes the
//!   changed keys and, in the same atomic batch, the changelog offset they reach (the
//!   checkpoint); recovery loads the partition and replays the changelog after the checkpoint.

use crate::error::{Error, Result};
use bytes::Bytes;
use std::fmt;
use std::path::PathBuf;

/// Entries of one table partition as stored: encoded key, encoded value.
pub(crate) type Entries = Vec<(Bytes, Bytes)>;

/// A change to write: encoded key, and the encoded value or `None` for a deletion.
pub(crate) type Change = (Bytes, Option<Bytes>);

/// Local storage of table partitions.
pub(crate) trait Store: Send + Sync + fmt::Debug + 'static {
    /// Short description for logs and the banner, e.g. `fjall://./data`.
    fn describe(&self) -> String;

    /// Whether the store keeps anything across restarts.
    fn is_persistent(&self) -> bool;

    /// The stored entries of a partition and the changelog offset they include (the offset of
    /// the last changelog record applied), if any.
    fn load(&self, table: &str, partition: u32) -> Result<(Entries, Option<i64>)>;

    /// Applies `changes` and records `checkpoint` for the partition, atomically.
    fn write(&self, table: &str, partition: u32, changes: &[Change], checkpoint: i64)
        -> Result<()>;

    /// Makes `entries` the whole content of the partition, with `checkpoint`: for a partition
    /// whose state came from somewhere other than this store (the changelog into an empty
    /// store, a standby copy promoted to active). A crash part-way leaves the partition
    /// without a checkpoint, never with one that claims entries the store lacks.
    fn replace(
        &self,
        table: &str,
        partition: u32,
        entries: &Entries,
        checkpoint: i64,
    ) -> Result<()>;

    /// Forgets a partition (its entries and checkpoint).
    fn clear(&self, table: &str, partition: u32) -> Result<()>;
}

/// The directory of the app's state in a persistent store (`None` for an in-memory one).
pub(crate) fn directory(url: &str, app_id: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("fjall://")?;
    let path = if path.is_empty() { "." } else { path };
    Some(PathBuf::from(path).join(app_id))
}

/// Opens the store a `store` setting names.
pub(crate) fn open(url: &str, app_id: &str) -> Result<std::sync::Arc<dyn Store>> {
    if url.is_empty() || url.starts_with("memory:") {
        return Ok(std::sync::Arc::new(MemoryStore));
    }
    if let Some(dir) = directory(url, app_id) {
        return Ok(std::sync::Arc::new(FjallStore::open(url, dir)?));
    }
    Err(Error::Config(format!(
        "unknown table store {url:?}: use memory:// or fjall://PATH"
    )))
}

/// Keeps nothing: tables are rebuilt from their changelogs.
#[derive(Debug)]
pub(crate) struct MemoryStore;

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    fn is_persistent(&self) -> bool {
        false
    }

    fn load(&self, _: &str, _: u32) -> Result<(Entries, Option<i64>)> {
        Ok((Vec::new(), None))
    }

    fn write(&self, _: &str, _: u32, _: &[Change], _: i64) -> Result<()> {
        Ok(())
    }

    fn replace(&self, _: &str, _: u32, _: &Entries, _: i64) -> Result<()> {
        Ok(())
    }

    fn clear(&self, _: &str, _: u32) -> Result<()> {
        Ok(())
    }
}

/// Table partitions in a fjall keyspace: one fjall partition per table, keys prefixed with the
/// table partition number (4 bytes, big-endian), and checkpoints in a fjall partition of
/// their own.
pub(crate) struct FjallStore {
    url: String,
    path: PathBuf,
    keyspace: fjall::Keyspace,
    checkpoints: fjall::PartitionHandle,
    tables: std::sync::Mutex<std::collections::HashMap<String, fjall::PartitionHandle>>,
}

impl fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.path)
            .finish()
    }
}

fn store_err(path: &std::path::Path, what: &str, e: impl fmt::Display) -> Error {
    Error::Store(format!("{what} ({}): {e}", path.display()))
}

/// A fjall partition name for a table: fjall allows `[A-Za-z0-9_-]`.
fn fjall_name(table: &str) -> String {
    let mut name = String::from("t_");
    for c in table.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            name.push(c);
        } else {
            // Escaped, so that distinct table names stay distinct.
            name.push_str(&format!("-{:x}-", c as u32));
        }
    }
    name
}

/// Entries per write batch when a partition is replaced whole (bounds the batch's memory).
const REPLACE_BATCH: usize = 64 * 1024;

fn prefixed(partition: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn checkpoint_key(table: &str, partition: u32) -> Vec<u8> {
    let mut k = table.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

impl FjallStore {
    pub(crate) fn open(url: &str, path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).map_err(|e| store_err(&path, "cannot create", e))?;
        let keyspace = fjall::Config::new(&path)
            .open()
            .map_err(|e| store_err(&path, "cannot open", e))?;
        let checkpoints = keyspace
            .open_partition("checkpoints", fjall::PartitionCreateOptions::default())
            .map_err(|e| store_err(&path, "cannot open checkpoints", e))?;
        Ok(Self {
            url: url.to_owned(),
            path,
            keyspace,
            checkpoints,
            tables: Default::default(),
        })
    }

    fn table(&self, table: &str) -> Result<fjall::PartitionHandle> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = tables.get(table) {
            return Ok(h.clone());
        }
        let h = self
            .keyspace
            .open_partition(&fjall_name(table), fjall::PartitionCreateOptions::default())
            .map_err(|e| store_err(&self.path, &format!("cannot open table {table:?}"), e))?;
        tables.insert(table.to_owned(), h.clone());
        Ok(h)
    }
}

impl Store for FjallStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn is_persistent(&self) -> bool {
        true
    }

    fn load(&self, table: &str, partition: u32) -> Result<(Entries, Option<i64>)> {
        let h = self.table(table)?;
        let mut entries = Vec::new();
        for kv in h.prefix(partition.to_be_bytes()) {
            let (k, v) = kv.map_err(|e| store_err(&self.path, "cannot read", e))?;
            entries.push((Bytes::copy_from_slice(&k[4..]), Bytes::copy_from_slice(&v)));
        }
        let checkpoint = self
            .checkpoints
            .get(checkpoint_key(table, partition))
            .map_err(|e| store_err(&self.path, "cannot read checkpoint", e))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(i64::from_be_bytes);
        Ok((entries, checkpoint))
    }

    fn write(
        &self,
        table: &str,
        partition: u32,
        changes: &[Change],
        checkpoint: i64,
    ) -> Result<()> {
        let h = self.table(table)?;
        let mut batch = self.keyspace.batch();
        for (k, v) in changes {
            let key = prefixed(partition, k);
            match v {
                Some(v) => batch.insert(&h, key, &v[..]),
                None => batch.remove(&h, key),
            }
        }
        batch.insert(
            &self.checkpoints,
            checkpoint_key(table, partition),
            checkpoint.to_be_bytes(),
        );
        batch
            .commit()
            .map_err(|e| store_err(&self.path, "cannot write", e))?;
        self.keyspace
            .persist(fjall::PersistMode::SyncData)
            .map_err(|e| store_err(&self.path, "cannot sync", e))
    }

    fn replace(
        &self,
        table: &str,
        partition: u32,
        entries: &Entries,
        checkpoint: i64,
    ) -> Result<()> {
        // The old content and the checkpoint go first, in one batch: until the last batch
        // writes the new checkpoint, a restart sees no checkpoint and replays the whole
        // changelog over whatever part of the entries was written.
        self.clear(table, partition)?;
        let h = self.table(table)?;
        for chunk in entries.chunks(REPLACE_BATCH) {
            let mut batch = self.keyspace.batch();
            for (k, v) in chunk {
                batch.insert(&h, prefixed(partition, k), &v[..]);
            }
            batch
                .commit()
                .map_err(|e| store_err(&self.path, "cannot write", e))?;
        }
        let mut batch = self.keyspace.batch();
        batch.insert(
            &self.checkpoints,
            checkpoint_key(table, partition),
            checkpoint.to_be_bytes(),
        );
        batch
            .commit()
            .map_err(|e| store_err(&self.path, "cannot write", e))?;
        self.keyspace
            .persist(fjall::PersistMode::SyncData)
            .map_err(|e| store_err(&self.path, "cannot sync", e))
    }

    fn clear(&self, table: &str, partition: u32) -> Result<()> {
        let h = self.table(table)?;
        let mut batch = self.keyspace.batch();
        for kv in h.prefix(partition.to_be_bytes()) {
            let (k, _) = kv.map_err(|e| store_err(&self.path, "cannot read", e))?;
            batch.remove(&h, k);
        }
        batch.remove(&self.checkpoints, checkpoint_key(table, partition));
        batch
            .commit()
            .map_err(|e| store_err(&self.path, "cannot clear", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rill-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn fjall_keeps_partitions_and_checkpoints_across_reopen() {
        let d = dir("reopen");
        {
            let s = FjallStore::open("fjall://x", d.clone()).expect("open");
            let changes = vec![
                (Bytes::from("\"a\""), Some(Bytes::from("1"))),
                (Bytes::from("\"b\""), Some(Bytes::from("2"))),
            ];
            s.write("counts", 3, &changes, 41).expect("write");
            s.write(
                "counts",
                4,
                &[(Bytes::from("\"a\""), Some(Bytes::from("9")))],
                7,
            )
            .expect("write");
            s.write("counts", 3, &[(Bytes::from("\"b\""), None)], 42)
                .expect("write");
        }
        let s = FjallStore::open("fjall://x", d.clone()).expect("reopen");
        let (entries, cp) = s.load("counts", 3).expect("load");
        assert_eq!(entries, vec![(Bytes::from("\"a\""), Bytes::from("1"))]);
        assert_eq!(cp, Some(42));
        let (entries, cp) = s.load("counts", 4).expect("load");
        assert_eq!(entries, vec![(Bytes::from("\"a\""), Bytes::from("9"))]);
        assert_eq!(cp, Some(7));
        assert_eq!(s.load("other", 3).expect("load"), (vec![], None));
        s.clear("counts", 3).expect("clear");
        assert_eq!(s.load("counts", 3).expect("load"), (vec![], None));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn replace_makes_the_entries_the_whole_partition() {
        let d = dir("replace");
        {
            let s = FjallStore::open("fjall://x", d.clone()).expect("open");
            let old = vec![
                (Bytes::from("\"a\""), Some(Bytes::from("1"))),
                (Bytes::from("\"gone\""), Some(Bytes::from("2"))),
            ];
            s.write("counts", 1, &old, 10).expect("write");
            s.write("counts", 2, &old, 3).expect("write");
            let new: Entries = (0..200_000u32)
                .map(|i| {
                    (
                        Bytes::from(format!("{i}")),
                        Bytes::from(format!("{}", i * 2)),
                    )
                })
                .collect();
            s.replace("counts", 1, &new, 99).expect("replace");
        }
        let s = FjallStore::open("fjall://x", d.clone()).expect("reopen");
        let (entries, cp) = s.load("counts", 1).expect("load");
        assert_eq!(cp, Some(99));
        assert_eq!(
            entries.len(),
            200_000,
            "every new entry, none of the old ones"
        );
        assert!(entries.iter().all(|(k, _)| &k[..] != b"\"gone\""));
        // Other partitions are untouched.
        let (entries, cp) = s.load("counts", 2).expect("load");
        assert_eq!((entries.len(), cp), (2, Some(3)));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn table_names_map_to_distinct_fjall_names() {
        assert_eq!(fjall_name("word_counts"), "t_word_counts");
        assert_ne!(fjall_name("a.b"), fjall_name("a-b"));
        assert!(fjall_name("a.b/c")
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn unknown_store_urls_are_refused() {
        let e = open("rocksdb://x", "app").expect_err("refused");
        assert!(e.to_string().contains("rocksdb://x"), "{e}");
    }
}
