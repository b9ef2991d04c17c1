//! Bad input: messages an agent cannot read. Each is logged once, counted, and either skipped
//! or copied to the agent's dead-letter topic (see [`BadInput`]) before its offset is acked.

use crate::engine::ack::Acks;
use crate::settings::{BadInput, Settings};
use crate::stream::ActorCtx;
use crate::transport::{Message, TopicSpec};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Headers a dead-letter record carries besides the original ones.
pub(crate) const ERROR: &str = "rill.error";
pub(crate) const TOPIC: &str = "rill.topic";
pub(crate) const PARTITION: &str = "rill.partition";
pub(crate) const OFFSET: &str = "rill.offset";
pub(crate) const CODEC: &str = "rill.codec";
pub(crate) const AGENT: &str = "rill.agent";
/// Header of a dead-letter record that does not hold the whole message (it was too large).
pub(crate) const TRUNCATED: &str = "rill.truncated";
/// Header of a truncated dead-letter record: bytes of the original key and value.
pub(crate) const ORIGINAL_SIZE: &str = "rill.original-size";

/// Longest wait between two attempts to write a dead-letter record.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// A message an agent cannot read, with the acks that mark it done.
pub(crate) struct Rejected {
    pub(crate) message: Arc<Message>,
    pub(crate) acks: Acks,
    /// What could not be read: `key`, `value`, or the whole `message` (too large).
    pub(crate) part: &'static str,
    /// Name of the codec that was to read it.
    pub(crate) codec: &'static str,
    /// Why it cannot be read.
    pub(crate) error: String,
}

impl Rejected {
    /// A payload `codec` could not decode. A tombstone (no value at all) says so.
    pub(crate) fn undecodable(
        message: Arc<Message>,
        acks: Acks,
        part: &'static str,
        error: crate::codec::CodecError,
    ) -> Self {
        let tombstone = part == "value" && message.value.is_none();
        Self {
            error: if tombstone {
                format!("null value (tombstone): {}", error.message)
            } else {
                error.message
            },
            message,
            acks,
            part,
            codec: error.codec,
        }
    }
}

/// The oversize check of `max_payload_bytes`: the error when `message` is larger.
pub(crate) fn oversize(message: &Message, max: usize) -> Option<String> {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    let size = len(&message.key) + len(&message.value);
    (size > max).then(|| format!("{size} bytes is larger than max_payload_bytes ({max})"))
}

/// The dead-letter topic of `agent`, if it sends bad input there: `<app id>-<agent>-dead-letter`,
/// an internal topic of one partition (as Kafka Connect's), so it keeps the order in which the
/// agent met its bad input. Characters Kafka does not allow in topic names become `_`.
pub(crate) fn dead_letter_spec(
    app_id: &str,
    agent: &str,
    enabled: Option<bool>,
    settings: &Settings,
) -> Option<TopicSpec> {
    if !enabled.unwrap_or(settings.bad_input == BadInput::DeadLetter) {
        return None;
    }
    let name: String = format!("{app_id}-{agent}-dead-letter")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    Some(TopicSpec {
        name,
        partitions: 1,
        replication_factor: settings.topic_replication_factor,
        compacted: false,
        retention: Default::default(),
    })
}

/// Logs and counts a message an agent cannot read, then skips it or dead-letters it. Its
/// offset is acked when this returns, except when the dead-letter record could not be written
/// before the worker stopped: then it is never committed, and read again after a restart.
pub(crate) async fn reject(ctx: Arc<ActorCtx>, r: Rejected) {
    let rt = &ctx.runtime;
    let m = &r.message;
    rt.stats.decode_error(
        &m.topic,
        format!(
            "cannot read the {} at {}[{}]@{}: {}",
            r.part, m.topic, m.partition, m.offset, r.error
        ),
    );
    crate::metrics::decode_error(&rt.app_id, &m.topic);
    let dead_letter = ctx.dead_letter.as_ref();
    let action = match dead_letter {
        Some(_) => "event sent to the dead-letter topic",
        None => "event skipped",
    };
    tracing::error!(
        agent = %ctx.agent,
        topic = %m.topic,
        partition = m.partition,
        offset = m.offset,
        codec = %r.codec,
        error = %r.error,
        dead_letter = dead_letter.map(|s| tracing::field::display(&s.name)),
        "bad input: cannot read the {}; {action}",
        r.part
    );
    if let Some(spec) = dead_letter {
        let spec = spec.clone();
        send_dead_letter(ctx, spec, r).await;
    }
}

/// How long an agent waits for the dead-letter copy of its bad input before it goes on with
/// its other events (the copy is then written in the background, its event committed only
/// once it is durable).
const INLINE_WAIT: Duration = Duration::from_secs(1);

/// Most bytes of the key and of the value a truncated dead-letter copy keeps.
const TRUNCATED_BYTES: usize = 64 * 1024;

/// Writes the dead-letter copy of `r`, then acks `r`. A copy the brokers cannot take because
/// of the record itself (too large) is replaced by a truncated one; one refused for another
/// reason (the brokers are unreachable, say) is retried until it is durable or the worker
/// stops. The agent waits for the copy at most [`INLINE_WAIT`], so a copy that cannot be
/// written soon never holds up the agent's other events and partitions.
async fn send_dead_letter(ctx: Arc<ActorCtx>, spec: TopicSpec, r: Rejected) {
    let mut headers = r.message.headers.clone();
    let m = &r.message;
    for (name, value) in [
        (ERROR, format!("cannot read the {}: {}", r.part, r.error)),
        (TOPIC, m.topic.to_string()),
        (PARTITION, m.partition.to_string()),
        (OFFSET, m.offset.to_string()),
        (CODEC, r.codec.to_owned()),
        (AGENT, ctx.agent.to_string()),
    ] {
        headers.push((name.to_owned(), Bytes::from(value)));
    }
    let letter = DeadLetter {
        ctx,
        spec,
        r,
        headers,
        copy: Copy::Whole,
    };
    let (agent, at) = (letter.ctx.agent.clone(), letter.at());
    let mut writing = tokio::spawn(letter.write());
    if tokio::time::timeout(INLINE_WAIT, &mut writing)
        .await
        .is_err()
    {
        tracing::warn!(
            agent = %agent,
            "the dead-letter copy of {at} is not written yet; the agent goes on, and the event \
             is committed once its copy is"
        );
    }
}

/// The dead-letter copy of a rejected message, being written.
struct DeadLetter {
    ctx: Arc<ActorCtx>,
    spec: TopicSpec,
    r: Rejected,
    headers: Vec<(String, Bytes)>,
    copy: Copy,
}

/// What a dead-letter copy holds of the original key and value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Copy {
    Whole,
    /// At most [`TRUNCATED_BYTES`] of each.
    Truncated,
    /// Neither: only the headers.
    Bare,
}

impl DeadLetter {
    /// `topic[partition]@offset` of the original message.
    fn at(&self) -> String {
        let m = &self.r.message;
        format!("{}[{}]@{}", m.topic, m.partition, m.offset)
    }

    /// Writes a copy (a smaller one after each refusal for its size), retrying other errors
    /// with backoff, then acks the event; gives the event up if the worker stops first.
    async fn write(mut self) {
        let rt = self.ctx.runtime.clone();
        let mut wait = Duration::from_millis(100);
        let mut retrying = false;
        for attempt in 1u32.. {
            // A retry gives up when the worker stops; a first attempt of a copy is made even
            // then, as the agent's other events are finished.
            let sent = tokio::select! {
                sent = self.send() => sent,
                () = rt.stop.cancelled(), if retrying => Err(crate::Error::ShuttingDown {
                    app: rt.app_id.to_string(),
                }),
            };
            let e = match sent {
                Ok(()) => {
                    rt.stats.dead_lettered(&self.ctx.agent);
                    return drop(self.r.acks);
                }
                Err(e) => e,
            };
            let permanent = matches!(&e, crate::Error::Transport(t) if t.is_permanent());
            let e = e.to_string();
            if permanent {
                self.refused(&e);
                match self.copy {
                    Copy::Whole => self.copy = Copy::Truncated,
                    Copy::Truncated => self.copy = Copy::Bare,
                    Copy::Bare => return drop(self.r.acks),
                }
                retrying = false;
                continue;
            }
            retrying = true;
            let stopping = rt.stop.is_cancelled();
            tracing::error!(
                agent = %self.ctx.agent,
                dead_letter = %self.spec.name,
                attempt,
                error = %e,
                "cannot write the dead-letter record of {}; {}",
                self.at(),
                if stopping {
                    "the worker is stopping: the event is not committed and is read again after a restart"
                } else {
                    "retrying (the event is not committed until it is written)"
                }
            );
            if stopping {
                return self.r.acks.abandon();
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = rt.stop.cancelled() => {}
            }
            wait = (wait * 2).min(MAX_RETRY_WAIT);
        }
    }

    /// Logs and counts a copy the brokers will never take.
    fn refused(&self, error: &str) {
        let m = &self.r.message;
        let rt = &self.ctx.runtime;
        if self.copy == Copy::Whole {
            crate::metrics::dead_letter_error(&rt.app_id, &self.ctx.agent);
        }
        tracing::error!(
            agent = %self.ctx.agent,
            dead_letter = %self.spec.name,
            topic = %m.topic,
            partition = m.partition,
            offset = m.offset,
            error = %error,
            "cannot write the dead-letter record of {}; {}",
            self.at(),
            match self.copy {
                Copy::Whole => "it is refused for good: writing a truncated copy instead",
                Copy::Truncated => "its truncated copy is refused too: writing one without key and value",
                Copy::Bare => "no copy can be written: the event is skipped",
            }
        );
    }

    /// One attempt to write the current copy.
    async fn send(&self) -> crate::Result<()> {
        let rt = &self.ctx.runtime;
        let m = &self.r.message;
        // One partition unless the user made more: then the source's partition's.
        let n = rt.partitions(&self.spec).await?;
        let partition = Some(m.partition % n.max(1));
        let (key, value, headers) = match self.copy {
            Copy::Whole => (m.key.clone(), m.value.clone(), self.headers.clone()),
            Copy::Truncated => (
                m.key.as_ref().map(truncated),
                m.value.as_ref().map(truncated),
                self.truncated_headers(),
            ),
            Copy::Bare => (None, None, self.truncated_headers()),
        };
        rt.produce(&self.spec, partition, key, value, headers)
            .await
            .map(drop)
    }

    /// The headers of a copy that does not hold the whole message: the original ones and
    /// rill's, plus `rill.truncated` and `rill.original-size` (bytes of key and value).
    fn truncated_headers(&self) -> Vec<(String, Bytes)> {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        let size = len(&self.r.message.key) + len(&self.r.message.value);
        let mut headers = self.headers.clone();
        headers.push((TRUNCATED.to_owned(), Bytes::from_static(b"true")));
        headers.push((ORIGINAL_SIZE.to_owned(), Bytes::from(size.to_string())));
        headers
    }
}

fn truncated(bytes: &Bytes) -> Bytes {
    bytes.slice(..bytes.len().min(TRUNCATED_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_topic_names_are_valid_kafka_names() {
        let s = Settings {
            bad_input: BadInput::DeadLetter,
            ..Settings::default()
        };
        let spec = dead_letter_spec("app", "my::agent<T>", None, &s).unwrap();
        assert_eq!(spec.name, "app-my__agent_T_-dead-letter");
        assert!(dead_letter_spec("app", "a", Some(false), &s).is_none());
        assert!(dead_letter_spec("app", "a", None, &Settings::default()).is_none());
        assert!(dead_letter_spec("app", "a", Some(true), &Settings::default()).is_some());
    }

    #[test]
    fn oversize_counts_key_and_value() {
        let m = Message {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            timestamp: 0,
            key: Some(Bytes::from_static(b"kk")),
            value: Some(Bytes::from_static(b"vvv")),
            headers: Vec::new(),
        };
        assert_eq!(oversize(&m, 5), None);
        assert_eq!(
            oversize(&m, 4).as_deref(),
            Some("5 bytes is larger than max_payload_bytes (4)")
        );
    }
}
