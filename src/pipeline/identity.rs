//! The commit gate on a topic's identity: no flush is committed until the broker has confirmed,
//! after the flush's last record was received, that the topic is still the one whose id the
//! partition was assigned with.
//!
//! Why: a topic deleted and created again under the same name, under a running consumer, is
//! read on at the old fetch position (librdkafka notices the new topic id but does not reset
//! the position when the new topic's log already reaches it; `rdkafka_topic.c`, "FIXME: an
//! offset reset must be triggered"). No error and no rebalance tells the application, and the
//! new topic's records would be committed as if they followed the old ones, its first records
//! skipped. The records themselves carry nothing that tells the two topics apart.
//!
//! Invariant: a flush is committed only when a topic-id lookup *issued after* the worker
//! received the flush's last record found the expected id (or no topic at all: a deleted topic
//! has no new records to confuse). Records received before that lookup were fetched before it,
//! so they belong to the expected topic. Lookups are shared: one round answers every flush
//! waiting on it, and a flush asks at the start of its staging, so the answer usually arrives
//! before the staging ends. A topic found with another id stops: every waiting and later flush
//! of it is refused (its records are discarded, not committed) and the source is told
//! ([`Event::TopicRecreated`]) to quarantine the topic's partitions.
//!
//! Topics without an expected id (a broker without topic ids) pass at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use super::Event;
use crate::error::Error;

/// Looks up topic ids (blocking): each existing topic's id, absent topics left out.
pub type Describe =
    Box<dyn Fn(&[String]) -> Result<HashMap<String, String>, Error> + Send + Sync + 'static>;

/// A topic found with another id than its partitions were assigned with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "topic `{topic}` was deleted and created again while it was read (topic id {expected}, now \
     {found}): records received since may belong to the new topic, so they are not committed"
)]
pub struct Recreated {
    pub topic: String,
    pub expected: String,
    pub found: String,
}

/// How long a failed lookup waits before the next.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// The id each topic had when its partitions were assigned.
    expected: HashMap<String, String>,
    /// The issue time of the latest lookup that found the expected id.
    confirmed: HashMap<String, Instant>,
    /// Topics with a flush waiting for a lookup.
    wanted: HashMap<String, Instant>,
    /// Topics found with another id: (expected, found).
    recreated: HashMap<String, (String, String)>,
    /// A lookup round is running; `issued` is when its current lookup was issued.
    running: Option<Instant>,
}

/// The shared gate (see the module docs).
pub struct TopicIdentities {
    state: Mutex<State>,
    changed: Notify,
    describe: Describe,
    events: Mutex<Option<mpsc::UnboundedSender<Event>>>,
}

impl std::fmt::Debug for TopicIdentities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicIdentities").finish_non_exhaustive()
    }
}

impl TopicIdentities {
    pub fn new(describe: Describe) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            describe,
            events: Mutex::new(None),
        })
    }

    /// A gate that expects nothing: every flush passes (tests, brokers without topic ids).
    pub fn none() -> Arc<Self> {
        Self::new(Box::new(|_| Ok(HashMap::new())))
    }

    /// Looks `topics` up now (blocking): each existing topic's id.
    pub fn describe(&self, topics: &[String]) -> Result<HashMap<String, String>, Error> {
        (self.describe)(topics)
    }

    /// Where a topic found recreated is reported.
    pub fn report_to(&self, events: mpsc::UnboundedSender<Event>) {
        *self.events.lock().expect("identities") = Some(events);
    }

    /// The partitions of `topic` were assigned with `id`, looked up at `issued`.
    pub fn expect(&self, topic: &str, id: &str, issued: Instant) {
        let mut s = self.state.lock().expect("identities");
        s.expected.insert(topic.to_string(), id.to_string());
        s.recreated.remove(topic);
        let c = s.confirmed.entry(topic.to_string()).or_insert(issued);
        *c = (*c).max(issued);
    }

    /// Waits until `topic` is confirmed for records received by `received_by`; `Err` with the
    /// reason when it was recreated (the flush must not be committed).
    pub async fn confirm(
        self: Arc<Self>,
        topic: String,
        received_by: Instant,
    ) -> Result<(), Recreated> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().expect("identities");
                if let Some((expected, found)) = s.recreated.get(&topic) {
                    return Err(Recreated {
                        topic: topic.clone(),
                        expected: expected.clone(),
                        found: found.clone(),
                    });
                }
                if !s.expected.contains_key(&topic) {
                    return Ok(());
                }
                if s.confirmed.get(&topic).is_some_and(|c| *c >= received_by) {
                    return Ok(());
                }
                let w = s.wanted.entry(topic.clone()).or_insert(received_by);
                *w = (*w).max(received_by);
                if s.running.is_none() {
                    s.running = Some(Instant::now());
                    tokio::spawn(self.clone().rounds());
                }
            }
            notified.await;
        }
    }

    /// Lookup rounds while flushes wait: each lookup covers every topic wanted when it is
    /// issued; the rounds end when nothing is wanted.
    async fn rounds(self: Arc<Self>) {
        loop {
            let (topics, issued) = {
                let mut s = self.state.lock().expect("identities");
                let issued = Instant::now();
                let topics: Vec<String> = s.wanted.keys().cloned().collect();
                if topics.is_empty() {
                    s.running = None;
                    return;
                }
                s.running = Some(issued);
                (topics, issued)
            };
            let this = self.clone();
            let asked = topics.clone();
            let found = tokio::task::spawn_blocking(move || (this.describe)(&asked))
                .await
                .unwrap_or_else(|e| Err(Error::kafka("the topic-id lookup task failed", e)));
            debug!(
                ?topics,
                ms = issued.elapsed().as_millis() as u64,
                ok = found.is_ok(),
                "looked up topic ids"
            );
            match found {
                Ok(ids) => self.settle(&topics, issued, &ids),
                Err(e) => {
                    warn!("cannot look up the ids of {topics:?} (commits of them wait): {e}");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
            self.changed.notify_waiters();
        }
    }

    fn settle(&self, topics: &[String], issued: Instant, ids: &HashMap<String, String>) {
        let mut s = self.state.lock().expect("identities");
        for topic in topics {
            let Some(expected) = s.expected.get(topic).cloned() else {
                s.wanted.remove(topic);
                continue;
            };
            match ids.get(topic) {
                Some(found) if *found != expected => {
                    s.wanted.remove(topic);
                    s.recreated
                        .insert(topic.clone(), (expected.clone(), found.clone()));
                    if let Some(events) = &*self.events.lock().expect("identities") {
                        let _ = events.send(Event::TopicRecreated {
                            topic: topic.clone(),
                            recorded: expected,
                            current: found.clone(),
                        });
                    }
                }
                // The expected topic, or none (deleted: no new records to confuse).
                _ => {
                    let c = s.confirmed.entry(topic.clone()).or_insert(issued);
                    *c = (*c).max(issued);
                    if s.wanted.get(topic).is_some_and(|w| *w <= issued) {
                        s.wanted.remove(topic);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(answer: &'static str) -> Arc<TopicIdentities> {
        TopicIdentities::new(Box::new(move |topics| {
            Ok(topics
                .iter()
                .map(|t| (t.clone(), answer.to_string()))
                .collect())
        }))
    }

    #[tokio::test]
    async fn a_flush_waits_for_a_lookup_issued_after_its_records() {
        let g = gate("A");
        let before = Instant::now();
        g.expect("t", "A", before);
        // Records received before the assignment's lookup: confirmed already.
        g.clone().confirm("t".into(), before).await.unwrap();
        // Received later: a new lookup confirms them.
        g.clone().confirm("t".into(), Instant::now()).await.unwrap();
        assert!(g.state.lock().unwrap().confirmed["t"] > before);
        // Unknown topics (no id expected) pass.
        g.clone()
            .confirm("other".into(), Instant::now())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_recreated_topic_refuses_every_flush_and_is_reported() {
        let g = gate("B");
        let (tx, mut rx) = mpsc::unbounded_channel();
        g.report_to(tx);
        g.expect("t", "A", Instant::now());
        let e = g
            .clone()
            .confirm("t".into(), Instant::now())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("created again") && e.contains("A") && e.contains("B"),
            "{e}"
        );
        let e2 = g
            .clone()
            .confirm("t".into(), Instant::now())
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, e2);
        match rx.try_recv().unwrap() {
            Event::TopicRecreated {
                topic,
                recorded,
                current,
            } => {
                assert_eq!(
                    (topic.as_str(), recorded.as_str(), current.as_str()),
                    ("t", "A", "B")
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
