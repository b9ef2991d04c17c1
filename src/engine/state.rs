//! What the engine needs of the app's state: the partitions of each table follow the
//! partitions the group assigns, and their changes are written with every commit. The state
//! layer (`table`) implements [`PartitionedState`]; the engine knows nothing else of it.

use crate::error::Result;
use futures::future::BoxFuture;

/// What a commit wrote to a state's changelog, handed back to it by
/// [`persist`](PartitionedState::persist) once the changelog has it. Only the state that
/// wrote it reads it.
pub(crate) type Flushed = Box<dyn std::any::Any + Send>;

/// A table with its types erased, as the dispatcher keeps it.
pub(crate) trait PartitionedState: Send + Sync {
    fn name(&self) -> &str;
    /// Restores `partitions` (from the store, then the changelog).
    fn recover<'a>(&'a self, partitions: &'a [u32]) -> BoxFuture<'a, Result<()>>;
    /// The end offsets of the changelog's partitions, read before a revocation is committed
    /// (and so before a new owner can write): where copies set aside then stand at most.
    fn changelog_ends(&self) -> BoxFuture<'_, Result<Vec<i64>>>;
    /// Sets revoked partitions aside (after they were committed): they are no longer read,
    /// and are restored cheaply if they come back, replaying the changelog from `ends` (see
    /// [`changelog_ends`](PartitionedState::changelog_ends)).
    fn park<'a>(&'a self, partitions: &'a [u32], ends: &'a [i64]) -> BoxFuture<'a, Result<()>>;
    /// Drops partitions set aside by [`park`](PartitionedState::park) that did not come back.
    fn drop_parked(&self);
    /// Drops partitions this worker no longer owns (after they were committed).
    fn release(&self, partitions: &[u32]);
    /// Writes the changes since the last commit to the changelog.
    fn flush(&self) -> BoxFuture<'_, Result<Flushed>>;
    /// Stores what [`flush`](PartitionedState::flush) wrote, once the changelog has it.
    fn persist(&self, flushed: Flushed) -> Result<()>;
    /// Partitions being restored (not served yet).
    fn restoring(&self) -> Vec<u32>;
}
