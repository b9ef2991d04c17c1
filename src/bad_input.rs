//! Bad input: messages an agent cannot read. Each is logged once, counted, and either skipped
//! or copied to the agent's dead-letter topic (see [`BadInput`]) before its offset is acked.

use crate::ack::Acks;
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
    })
}

/// Logs and counts a message an agent cannot read, then skips it or dead-letters it. Its
/// offset is acked when this returns, except when the dead-letter record could not be written
/// before the worker stopped: then it is never committed, and read again after a restart.
pub(crate) async fn reject(ctx: Arc<ActorCtx>, r: Rejected) {
    let rt = &ctx.runtime;
    let m = &r.message;
    rt.stats.decode_error(&m.topic);
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
        send_dead_letter(&ctx, spec, r).await;
    }
}

/// Writes the dead-letter record of `r` (retrying until it is durable or the worker stops),
/// then acks `r`.
async fn send_dead_letter(ctx: &ActorCtx, spec: &TopicSpec, r: Rejected) {
    let rt = &ctx.runtime;
    let m = &r.message;
    let mut headers = m.headers.clone();
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
    let mut wait = Duration::from_millis(100);
    for attempt in 1u32.. {
        let sent = match rt.partitions(spec).await {
            Ok(n) => {
                // One partition unless the user made more: then the source's partition's.
                let partition = Some(m.partition % n.max(1));
                let (key, value) = (m.key.clone(), m.value.clone());
                rt.produce(spec, partition, key, value, headers.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        let Err(e) = sent else {
            return drop(r.acks);
        };
        let stopping = rt.stop.is_cancelled();
        tracing::error!(
            agent = %ctx.agent,
            dead_letter = %spec.name,
            attempt,
            error = %e,
            "cannot write the dead-letter record of {}[{}]@{}; {}",
            m.topic,
            m.partition,
            m.offset,
            if stopping {
                "the worker is stopping: the event is not committed and is read again after a restart"
            } else {
                "retrying (the partition waits)"
            }
        );
        if stopping {
            return r.acks.abandon();
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = rt.stop.cancelled() => {}
        }
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
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
