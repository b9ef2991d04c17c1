//! What the parts of an app share, running or not: its id and settings, the topics it
//! declared, its embedded broker, and the runtime of the worker that runs it.

use super::Runtime;
use crate::codec::{SerializerError, SERIALIZERS};
use crate::error::{Error, Result};
use crate::settings::Settings;
use crate::transport::{MemoryBroker, Retention, TopicSpec};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// What the app declared of a topic.
#[derive(Debug, Clone, Copy, Default)]
struct Declared {
    partitions: Option<u32>,
    retention: Retention,
}

/// What the parts of an app share, running or not.
pub(crate) struct AppCore {
    pub(crate) id: Arc<str>,
    settings: RwLock<Settings>,
    memory: Arc<MemoryBroker>,
    declared: Mutex<BTreeMap<String, Declared>>,
    /// Serializers named in declarations that do not exist: whose, and the error.
    unknown_serializers: Mutex<Vec<(String, SerializerError)>>,
    runtime: RwLock<Option<Arc<Runtime>>>,
}

impl AppCore {
    pub(crate) fn new(id: Arc<str>, settings: Settings) -> Self {
        Self {
            id,
            settings: RwLock::new(settings),
            memory: MemoryBroker::new(),
            declared: Mutex::new(BTreeMap::new()),
            unknown_serializers: Mutex::new(Vec::new()),
            runtime: RwLock::new(None),
        }
    }

    /// Changes the settings (a worker started afterwards has them).
    pub(crate) fn configure(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.settings.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The app's own embedded broker (what `memory://` connects to).
    pub(crate) fn memory(&self) -> Arc<MemoryBroker> {
        self.memory.clone()
    }

    pub(crate) fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn declare(&self, name: &str, partitions: Option<u32>) {
        let mut d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        let entry = d.entry(name.to_owned()).or_default();
        if partitions.is_some() {
            entry.partitions = partitions;
        }
    }

    /// Records that a declaration names a serializer that does not exist: the worker refuses
    /// to start (see [`check_serializers`](AppCore::check_serializers)).
    pub(crate) fn unknown_serializer(&self, what: String, error: SerializerError) {
        self.unknown_serializers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what, error));
    }

    /// The first serializer named by string that does not exist: in the settings, or in a
    /// topic's declaration.
    pub(crate) fn check_serializers(&self) -> Result<()> {
        let settings = self.settings();
        for (what, name) in [
            ("Settings::key_serializer", &settings.key_serializer),
            ("Settings::value_serializer", &settings.value_serializer),
        ] {
            if let Some(name) = name.as_deref().filter(|n| !SERIALIZERS.contains(n)) {
                return Err(Error::Serializer {
                    what: what.to_owned(),
                    source: SerializerError::Unknown {
                        name: name.to_owned(),
                    },
                });
            }
        }
        let unknown = self
            .unknown_serializers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match unknown.first() {
            Some((what, error)) => Err(Error::Serializer {
                what: what.clone(),
                source: error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Sets what is kept of a declared topic.
    pub(crate) fn declare_retention(&self, name: &str, retention: Retention) {
        let mut d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        d.entry(name.to_owned()).or_default().retention = retention;
    }

    /// The names of the declared topics.
    pub(crate) fn declared_topics(&self) -> Vec<String> {
        let d = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        d.keys().cloned().collect()
    }

    /// The spec a topic is created with: its own partition count, else the declared one, else
    /// the app's default.
    pub(crate) fn topic_spec(&self, name: &str, partitions: Option<u32>) -> TopicSpec {
        let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or_default();
        TopicSpec {
            name: name.to_owned(),
            partitions: partitions
                .or(declared.partitions)
                .unwrap_or(settings.topic_partitions),
            replication_factor: settings.topic_replication_factor,
            compacted: false,
            retention: declared.retention,
        }
    }

    pub(crate) fn runtime(&self) -> Result<Arc<Runtime>> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::NotRunning {
                app: self.id.to_string(),
            })
    }

    /// Makes `rt` the runtime of the running worker.
    pub(crate) fn set_runtime(&self, rt: Arc<Runtime>) {
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = Some(rt);
    }

    pub(crate) fn clear_runtime(&self, rt: &Arc<Runtime>) {
        let mut slot = self.runtime.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|r| Arc::ptr_eq(r, rt)) {
            *slot = None;
        }
    }
}
