//! What the web server and the command line read of a table: lookups by key, and the row
//! that describes it.

use super::runner::TableRunner;
use super::{Table, TableKey, TableValue};

/// The answer to a lookup by key.
#[derive(Debug)]
pub(crate) enum Lookup {
    Found(serde_json::Value),
    /// Not here; `held` says whether this worker holds the key's partition.
    Missing {
        partition: u32,
        held: bool,
    },
    /// The key's partition is being restored.
    Recovering(u32),
    /// The key does not parse as a key of this table.
    BadKey(String),
}

/// The columns of [`table_row`].
pub(crate) const TABLE_COLUMNS: [&str; 3] = ["table", "changelog", "partitions"];

/// Name, changelog topic and partitions of a table, as the `tables` command and the status
/// page show them.
pub(crate) fn table_row(table: &dyn TableRunner) -> Vec<String> {
    let spec = table.changelog_spec();
    vec![
        table.name().to_owned(),
        spec.name,
        spec.partitions.to_string(),
    ]
}

impl<K: TableKey, V: TableValue> Table<K, V> {
    /// The value of a key given as text (JSON, or a bare string), as JSON.
    pub(super) fn lookup_text(&self, text: &str) -> Lookup {
        let key: K = match serde_json::from_str(text)
            .or_else(|_| serde_json::from_value(serde_json::Value::String(text.to_owned())))
        {
            Ok(k) => k,
            Err(e) => return Lookup::BadKey(e.to_string()),
        };
        let p = self.key_partition(&key);
        if self
            .inner
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
        {
            return Lookup::Recovering(p);
        }
        match self.get(&key) {
            Some(v) => match serde_json::to_value(&v) {
                Ok(j) => Lookup::Found(j),
                Err(e) => Lookup::BadKey(e.to_string()),
            },
            None => Lookup::Missing {
                partition: p,
                held: self.with_parts(|parts| parts.contains_key(&p)),
            },
        }
    }
}
