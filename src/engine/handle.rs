//! Narrow handles on a running worker, for the layers above the engine that must not reach
//! the whole [`Runtime`].

use super::Runtime;
use crate::error::Result;
use crate::settings::Settings;
use crate::transport::{Headers, RecordPosition, TopicSpec, Transport};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use tokio_util::sync::CancellationToken;

/// What a table uses of the worker it is attached to: the log its changelog is read from and
/// written to, where its standby copies go, its counters, and the signal that the worker
/// stops. Nothing of agents, dispatch or commits.
#[derive(Clone)]
pub(crate) struct StateHandle(Arc<Runtime>);

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StateHandle").field(&self.0.app_id).finish()
    }
}

/// Which worker a [`StateHandle`] was given by, without keeping it alive.
#[derive(Debug, Clone)]
pub(crate) struct WorkerRef(Weak<Runtime>);

impl WorkerRef {
    /// Whether both refer to the same worker.
    pub(crate) fn same(&self, other: &WorkerRef) -> bool {
        Weak::ptr_eq(&self.0, &other.0)
    }
}

impl StateHandle {
    pub(crate) fn new(rt: &Arc<Runtime>) -> Self {
        Self(rt.clone())
    }

    pub(crate) fn app_id(&self) -> &str {
        &self.0.app_id
    }

    /// The settings the worker started with.
    pub(crate) fn settings(&self) -> &Settings {
        &self.0.settings
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.0.transport
    }

    /// Cancelled when the worker starts to stop.
    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.0.stop
    }

    /// See [`Runtime::enqueue`].
    pub(crate) async fn enqueue(
        &self,
        spec: &TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<()> {
        self.0.enqueue(spec, partition, key, value, headers).await
    }

    /// See [`Runtime::produce`].
    pub(crate) async fn produce(
        &self,
        spec: &TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<RecordPosition> {
        self.0.produce(spec, partition, key, value, headers).await
    }

    /// The partitions of which this worker keeps standby copies (see
    /// [`Members::standby_partitions`](super::membership::Members::standby_partitions)).
    pub(crate) fn standby_partitions(
        &self,
        partitions: u32,
        replicas: u32,
    ) -> Option<BTreeSet<u32>> {
        self.0
            .members
            .standby_partitions(&self.0.instance, partitions, replicas)
    }

    /// Counts changelog records replayed to restore partitions of `table`.
    pub(crate) fn table_replayed(&self, table: &str, records: u64) {
        self.0.stats.table_replayed(table, records);
    }

    /// The worker this handle is on.
    pub(crate) fn worker(&self) -> WorkerRef {
        WorkerRef(Arc::downgrade(&self.0))
    }
}
