//! The crate's error type.

use crate::codec::{CodecError, SerializerError};
use std::time::Duration;

/// A boxed error from user code (agent bodies, sinks, commands).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in rill.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key or value could not be encoded before sending.
    #[error("cannot encode {what} for topic {topic:?}: {source}")]
    Encode {
        /// `key` or `value`.
        what: &'static str,
        /// The destination topic.
        topic: String,
        /// The codec's error.
        source: CodecError,
    },
    /// A payload could not be decoded.
    #[error("cannot decode {what} from {topic}[{partition}]@{offset}: {source}")]
    Decode {
        /// `key` or `value`.
        what: &'static str,
        /// Topic of the message.
        topic: String,
        /// Partition of the message.
        partition: u32,
        /// Offset of the message.
        offset: i64,
        /// The codec's error.
        source: CodecError,
    },
    /// The transport (embedded log or Kafka) reported an error.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// [`Worker::processed`](crate::Worker::processed) timed out: records of the topics the
    /// worker reads were still not processed and committed.
    #[error("the agents did not process and commit what their topics hold within {timeout:?}")]
    NotProcessed {
        /// How long the caller waited.
        timeout: Duration,
    },
    /// `ask` got no reply in time.
    #[error("no reply from agent {agent:?} within {timeout:?} (correlation id {correlation_id})")]
    AskTimeout {
        /// The agent asked.
        agent: String,
        /// How long the caller waited.
        timeout: Duration,
        /// The request's correlation id.
        correlation_id: String,
    },
    /// The app is not running, so the operation cannot be carried out.
    #[error(
        "app {app:?} is not running: start a worker (App::start or the `worker` command) first"
    )]
    NotRunning {
        /// The app id.
        app: String,
    },
    /// The app is shutting down.
    #[error("app {app:?} is shutting down")]
    ShuttingDown {
        /// The app id.
        app: String,
    },
    /// A channel's receivers are gone.
    #[error("channel {channel:?} is closed")]
    ChannelClosed {
        /// The channel's name.
        channel: String,
    },
    /// The app's declarations are inconsistent.
    #[error("configuration error: {0}")]
    Config(String),
    /// A table store (on disk) failed.
    #[error("table store: {0}")]
    Store(String),
    /// A table was used in a way it does not allow.
    #[error("table {table:?}: {message}")]
    Table {
        /// The table's name.
        table: String,
        /// What went wrong.
        message: String,
    },
    /// A user command failed.
    #[error("command {command:?} failed: {source}")]
    Command {
        /// The command's name.
        command: String,
        /// What the command returned.
        source: BoxError,
    },
    /// A serializer named by string (a topic's, or the app's default) is unknown or cannot
    /// carry the type it is given (reported when the worker starts).
    #[error("{what}: {source}")]
    Serializer {
        /// Whose serializer: e.g. `the value serializer of topic "orders"` or
        /// `Settings::key_serializer`.
        what: String,
        /// What is wrong with it.
        source: SerializerError,
    },
    /// A crontab's expression or time zone is invalid (reported when the worker starts).
    #[error("invalid crontab {expression:?}: {message}")]
    Crontab {
        /// The cron expression.
        expression: String,
        /// What is wrong with it, and the crontab's name.
        message: String,
    },
}

/// An error reported by a transport.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The partition does not exist.
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many the topic has.
        partitions: u32,
    },
    /// The topic exists with a different partition count than declared.
    #[error("topic {topic:?} exists with {actual} partitions but the app declares {declared}")]
    PartitionMismatch {
        /// The topic.
        topic: String,
        /// Partition count in the app.
        declared: u32,
        /// Partition count on the broker.
        actual: u32,
    },
    /// The broker URL is not understood.
    #[error(
        "unsupported broker URL {0:?}: use memory:// (embedded), file://PATH (embedded, on disk) or kafka://host:port"
    )]
    UnsupportedUrl(String),
    /// A transaction could not be committed and was aborted: nothing it wrote is visible
    /// and its input offsets are not committed (exactly-once processing).
    #[error("transaction aborted: {0}")]
    TransactionAborted(String),
    /// The log refuses a record for good (too large, malformed): sending it again cannot
    /// succeed, so the worker stops rather than skip it.
    #[error("record refused: {0}")]
    Rejected(String),
    /// Any other transport failure.
    #[error("{0}")]
    Other(String),
}

impl TransportError {
    /// Whether sending the same record again cannot succeed.
    pub(crate) fn is_permanent(&self) -> bool {
        matches!(
            self,
            TransportError::Rejected(_)
                | TransportError::UnknownPartition { .. }
                | TransportError::UnsupportedUrl(_)
        )
    }
}

/// Crate result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
