//! Membership: each worker with a web server or with standby table replicas to place
//! publishes, on every rebalance, its web address and the table partitions it holds to the
//! compacted topic `<app id>-workers` (keyed by its instance id, removed with a tombstone when
//! it stops), and reads that topic to learn where the other partitions are and where standby
//! copies go (see [`Members::standby_partitions`]).

use super::Runtime;
use crate::error::Result;
use crate::transport::{ConsumerEvent, StartAt, TopicSpec};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a worker says about itself on the membership topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Member {
    instance: String,
    /// `http://host:port` of its web server, if it serves one.
    #[serde(default)]
    web: Option<String>,
    /// Table partitions it holds.
    partitions: BTreeSet<u32>,
    /// When it said so (ms since the epoch): the latest claim to a partition wins.
    at: i64,
}

/// The workers of the app, as the membership topic tells.
#[derive(Debug, Default)]
pub(crate) struct Members {
    by_instance: Mutex<HashMap<String, Member>>,
}

impl Members {
    /// The web address of the other worker that most recently claimed `partition`.
    pub(crate) fn owner_of(&self, partition: u32, me: &str) -> Option<String> {
        self.by_instance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|m| m.instance != me && m.partitions.contains(&partition))
            .max_by_key(|m| m.at)
            .and_then(|m| m.web.clone())
    }

    /// The partitions of a table of `partitions` partitions of which worker `me` keeps
    /// standby copies, `replicas` copies of each partition being kept; `None` until `me` has
    /// published its own record.
    ///
    /// Placement: librdkafka cannot be given an assignor that prefers workers holding a warm
    /// copy, so the copies go where the group's range assignor will put each partition when
    /// its owner leaves. Range assignment gives each member, in member-id order, one
    /// contiguous range of each topic's partitions; the members' order therefore shows in
    /// their current assignments (sorted by the first partition each holds), and member ids
    /// do not change while a member stays in the group. For partition `p`, the first copy
    /// goes to the member that owns `p` in a range assignment over the members without `p`'s
    /// owner, the second to its owner over the members without those two, and so on. When
    /// any one worker fails or stops, every partition that changes hands (its own, and those
    /// the new ranges shift between the others) goes to the worker with the warm copy. Live members are those whose claim to some partition is
    /// the latest one (a killed worker's record stays until its partitions are claimed by
    /// others); a worker that holds no partition (more workers than partitions) cannot be
    /// placed in the order and gets no copies.
    pub(crate) fn standby_partitions(
        &self,
        me: &str,
        partitions: u32,
        replicas: u32,
    ) -> Option<BTreeSet<u32>> {
        let map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        map.get(me)?;
        Some(standby_placement(map.values(), me, partitions, replicas))
    }

    fn apply(&self, key: &[u8], value: Option<&[u8]>) {
        let instance = String::from_utf8_lossy(key).into_owned();
        let mut map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        match value.filter(|v| !v.is_empty()) {
            None => {
                map.remove(&instance);
            }
            Some(v) => match serde_json::from_slice::<Member>(v) {
                Ok(m) => {
                    map.insert(instance, m);
                }
                Err(e) => tracing::debug!(error = %e, "unreadable membership record ignored"),
            },
        }
    }
}

/// See [`Members::standby_partitions`].
fn standby_placement<'a>(
    members: impl Iterator<Item = &'a Member>,
    me: &str,
    partitions: u32,
    replicas: u32,
) -> BTreeSet<u32> {
    // The latest claim to each partition.
    let mut claims: HashMap<u32, (&'a str, i64)> = HashMap::new();
    for m in members {
        for &p in &m.partitions {
            let newer = claims
                .get(&p)
                .is_none_or(|&(who, at)| (m.at, m.instance.as_str()) > (at, who));
            if newer {
                claims.insert(p, (m.instance.as_str(), m.at));
            }
        }
    }
    // The live members in range order: by the first partition each holds.
    let mut first: HashMap<&str, u32> = HashMap::new();
    for (&p, &(who, _)) in &claims {
        let f = first.entry(who).or_insert(p);
        *f = (*f).min(p);
    }
    let mut order: Vec<(u32, &str)> = first.into_iter().map(|(who, p)| (p, who)).collect();
    order.sort_unstable();
    let order: Vec<&str> = order.into_iter().map(|(_, who)| who).collect();
    let mut mine = BTreeSet::new();
    for p in 0..partitions {
        let owner = match claims.get(&p) {
            Some(&(who, _)) => who,
            None => match range_owner(&order, partitions, p) {
                Some(who) => who,
                None => continue,
            },
        };
        let mut rest: Vec<&str> = order.iter().copied().filter(|w| *w != owner).collect();
        for _ in 0..replicas {
            let Some(next) = range_owner(&rest, partitions, p) else {
                break;
            };
            if next == me {
                mine.insert(p);
                break;
            }
            rest.retain(|w| *w != next);
        }
    }
    mine
}

/// The member that range assignment gives `partition` of `partitions` to, over `members` in
/// their order.
fn range_owner<'a>(members: &[&'a str], partitions: u32, partition: u32) -> Option<&'a str> {
    let n = members.len() as u32;
    if n == 0 || partition >= partitions {
        return None;
    }
    let (per, extra) = (partitions / n, partitions % n);
    (0..n)
        .find(|&i| {
            let start = i * per + i.min(extra);
            let len = per + u32::from(i < extra);
            (start..start + len).contains(&partition)
        })
        .map(|i| members[i as usize])
}

pub(crate) fn members_topic(app_id: &str) -> String {
    format!("{app_id}-workers")
}

/// Starts reading the membership topic (and publishing this worker's record on every
/// rebalance); stops when `closed` is cancelled.
pub(crate) async fn membership(
    rt: Arc<Runtime>,
    closed: CancellationToken,
) -> Result<JoinHandle<()>> {
    let spec = TopicSpec {
        name: members_topic(&rt.app_id),
        partitions: 1,
        replication_factor: rt.settings.topic_replication_factor,
        compacted: true,
        retention: Default::default(),
    };
    rt.ensure_topic(&spec).await?;
    let consumer = rt
        .transport
        .topic_consumer(&spec.name, StartAt::Earliest)
        .await?;
    rt.membership
        .store(true, std::sync::atomic::Ordering::Release);
    Ok(tokio::spawn(read_members(rt, consumer, closed)))
}

async fn read_members(
    rt: Arc<Runtime>,
    mut consumer: Box<dyn crate::transport::Consumer>,
    closed: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => break,
            event = consumer.poll() => match event {
                Ok(ConsumerEvent::Messages(batch)) => {
                    for m in batch {
                        if let Some(k) = m.key.as_deref() {
                            rt.members.apply(k, m.value.as_deref());
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "membership reader error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

/// Publishes this worker's web address and table partitions (or, with `None`, that it left).
pub(crate) async fn publish(rt: &Runtime, partitions: Option<&BTreeSet<u32>>) {
    if !rt.membership.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    let web = rt.web();
    let value = match partitions {
        Some(p) => {
            let member = Member {
                instance: rt.instance.clone(),
                web,
                partitions: p.clone(),
                at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            };
            match serde_json::to_vec(&member) {
                Ok(v) => Some(crate::codec::exact_bytes(v)),
                Err(_) => return,
            }
        }
        None => None,
    };
    let spec = rt.default_spec(&members_topic(&rt.app_id));
    let key = Bytes::from(rt.instance.clone());
    if let Err(e) = rt
        .enqueue(&spec, Some(0), Some(key), value, Vec::new())
        .await
    {
        tracing::warn!(error = %e, "cannot publish this worker's partitions");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_claim_to_a_partition_wins() {
        let m = Members::default();
        let rec = |i: &str, p: &[u32], at| {
            serde_json::to_vec(&Member {
                instance: i.into(),
                web: Some(format!("http://{i}")),
                partitions: p.iter().copied().collect(),
                at,
            })
            .expect("json")
        };
        m.apply(b"a", Some(&rec("a", &[0, 1], 10)));
        m.apply(b"b", Some(&rec("b", &[1, 2], 20)));
        assert_eq!(m.owner_of(1, "me").as_deref(), Some("http://b"));
        assert_eq!(m.owner_of(0, "me").as_deref(), Some("http://a"));
        assert_eq!(m.owner_of(0, "a"), None, "never forwards to itself");
        m.apply(b"b", None);
        assert_eq!(m.owner_of(1, "me").as_deref(), Some("http://a"));
        assert_eq!(m.owner_of(2, "me"), None);
    }

    fn member(instance: &str, partitions: impl IntoIterator<Item = u32>, at: i64) -> Member {
        Member {
            instance: instance.into(),
            web: None,
            partitions: partitions.into_iter().collect(),
            at,
        }
    }

    /// Range assignment as the group does it, over members in order.
    fn assign(members: &[&str], partitions: u32) -> Vec<Member> {
        members
            .iter()
            .map(|w| {
                let held =
                    (0..partitions).filter(|p| range_owner(members, partitions, *p) == Some(w));
                member(w, held, 1)
            })
            .collect()
    }

    #[test]
    fn standbys_go_where_the_range_assignor_moves_a_partition_when_its_owner_leaves() {
        // Member ids are random; the order shows in the assignment (z, a, m here).
        let members = assign(&["z", "a", "m"], 12);
        let placed = |me| standby_placement(members.iter(), me, 12, 1);
        assert_eq!(placed("a"), (0..4).chain(8..12).collect::<BTreeSet<u32>>());
        assert_eq!(placed("z"), [4, 5].into_iter().collect::<BTreeSet<u32>>());
        assert_eq!(placed("m"), [6, 7].into_iter().collect::<BTreeSet<u32>>());
    }

    #[test]
    fn every_partition_gets_its_replicas_on_the_workers_that_take_it_over() {
        let names = ["w0", "w1", "w2", "w3", "w4", "w5"];
        for n in 1..=names.len() {
            for partitions in n as u32..=13 {
                for replicas in 0..=3u32 {
                    let order = &names[..n];
                    let members = assign(order, partitions);
                    for p in 0..partitions {
                        let owner = range_owner(order, partitions, p).expect("owner");
                        let holders: Vec<&str> = order
                            .iter()
                            .copied()
                            .filter(|w| {
                                standby_placement(members.iter(), w, partitions, replicas)
                                    .contains(&p)
                            })
                            .collect();
                        let want = (replicas as usize).min(n - 1);
                        assert_eq!(holders.len(), want, "{n} workers, {partitions} partitions, {replicas} replicas, partition {p}: {holders:?}");
                        assert!(!holders.contains(&owner), "the owner keeps no standby");
                        if want > 0 {
                            // Any one worker leaves: range over the rest moves p (its owner
                            // left, or the ranges shifted) only to a holder of its copy.
                            for leaving in order {
                                let rest: Vec<&str> =
                                    order.iter().copied().filter(|w| w != leaving).collect();
                                let next = range_owner(&rest, partitions, p).expect("next");
                                assert!(
                                    next == owner || holders.contains(&next),
                                    "{leaving} leaves: partition {p} goes from {owner} to {next}, copies on {holders:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_killed_workers_record_stops_counting_once_its_partitions_are_claimed() {
        let m = Members::default();
        let put = |m: &Members, rec: Member| {
            let key = rec.instance.clone();
            m.apply(
                key.as_bytes(),
                Some(&serde_json::to_vec(&rec).expect("json")),
            );
        };
        for rec in [
            member("a", 0..2, 1),
            member("b", 2..4, 1),
            member("c", 4..6, 1),
        ] {
            put(&m, rec);
        }
        assert_eq!(m.standby_partitions("x", 6, 1), None, "x has not published");
        assert_eq!(
            m.standby_partitions("b", 6, 1),
            Some((0..2).chain(4..6).collect())
        );
        // c is killed; a and b take its partitions over (range over a, b) and say so later.
        put(&m, member("a", 0..3, 2));
        put(&m, member("b", 3..6, 2));
        assert_eq!(m.standby_partitions("a", 6, 1), Some((3..6).collect()));
        assert_eq!(m.standby_partitions("b", 6, 1), Some((0..3).collect()));
        assert_eq!(m.standby_partitions("c", 6, 1), Some(BTreeSet::new()));
    }
}
