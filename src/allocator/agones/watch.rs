//! This replica's view of the fleet: a label-filtered LIST, then a WATCH
//! from its `resourceVersion` (with bookmarks, so a resumed watch rarely
//! needs a new list), feeding an in-memory store.
//!
//! Written here rather than with kube-runtime's watcher for two reasons.
//! The view must know how far it can be trusted: a replica forwards a user
//! only to a server its view shows as theirs, so while the watch is broken
//! or relisting ([`Trust::Resyncing`]) the caller confirms with a GET,
//! and while the API server is unreachable ([`Trust::Unreachable`]) the
//! last view stands — no GameServer can change then (Agones needs the API
//! too). And one object must never stall the view: every GameServer
//! decodes (see [`super::types`]); one that cannot be understood is named
//! once in the log, counted, and counts as nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher::Event;

use super::types::GameServer;
use super::{clip, error_summary, unreachable, ERROR_TEXT};
use crate::metrics::Metrics;

/// How far the view can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trust {
    /// Listed, and watching without error: what it shows is current.
    Fresh,
    /// The API server cannot be reached: the view is as it was when it
    /// went away, and nothing can have changed since.
    Unreachable,
    /// The API answers, but the watch failed or is relisting: the view may
    /// be behind.
    Resyncing,
}

/// The shared state of the view; the store itself is read separately.
pub(super) struct ViewHealth {
    /// Listed at least once: the store holds the fleet.
    synced: AtomicBool,
    trust: AtomicU8,
}

impl ViewHealth {
    pub(super) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub(super) fn trust(&self) -> Trust {
        match self.trust.load(Ordering::Acquire) {
            0 => Trust::Fresh,
            1 => Trust::Unreachable,
            _ => Trust::Resyncing,
        }
    }

    fn set(&self, trust: Trust) {
        let value = match trust {
            Trust::Fresh => 0,
            Trust::Unreachable => 1,
            Trust::Resyncing => 2,
        };
        self.trust.store(value, Ordering::Release);
    }

    /// A call of the view's failed: unreachable or merely out of step.
    fn failed(&self, error: &kube::Error) {
        self.set(if unreachable(error) {
            Trust::Unreachable
        } else {
            Trust::Resyncing
        });
    }
}

/// How long one watch request stays open before it is resumed.
const WATCH_SECONDS: u32 = 290;
/// Retries after a failure start here and double up to [`MAX_BACKOFF`]: a
/// replica started while the API was away becomes ready within seconds of
/// its return.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts keeping the view of the GameServers `selector` matches.
pub(super) fn start(
    api: Api<GameServer>,
    selector: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
) -> (Store<GameServer>, Arc<ViewHealth>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let health = Arc::new(ViewHealth {
        synced: AtomicBool::new(false),
        trust: AtomicU8::new(2),
    });
    let watcher = Watcher {
        api,
        selector,
        timeout,
        metrics,
        health: health.clone(),
        writer,
        named: HashSet::new(),
    };
    (store, health, tokio::spawn(watcher.run()))
}

struct Watcher {
    api: Api<GameServer>,
    selector: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    health: Arc<ViewHealth>,
    writer: Writer<GameServer>,
    /// GameServers already named in the log as not understood.
    named: HashSet<String>,
}

/// Why a watch request ended.
enum Ended {
    /// Its time was up: resume from the last version seen.
    Resume(String),
    /// The version is too old to resume from (410 Gone): list again.
    Expired,
    /// It failed: wait, then resume.
    Failed(String),
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut version: Option<String> = None;
        loop {
            let from = match version.take() {
                Some(from) => from,
                None => match self.list().await {
                    Some(from) => from,
                    None => {
                        backoff = pause(backoff).await;
                        continue;
                    }
                },
            };
            match self.watch(from).await {
                Ended::Resume(from) => {
                    backoff = MIN_BACKOFF;
                    version = Some(from);
                }
                Ended::Expired => self.health.set(Trust::Resyncing),
                Ended::Failed(from) => {
                    version = Some(from);
                    backoff = pause(backoff).await;
                }
            }
        }
    }

    /// Lists the fleet into the store; the version to watch from.
    async fn list(&mut self) -> Option<String> {
        let params = ListParams::default().labels(&self.selector);
        let listed = match tokio::time::timeout(self.timeout, self.api.list(&params)).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                self.failed("list", &e);
                return None;
            }
            Err(_) => {
                self.metrics.kube_call("list", "timeout");
                self.health.set(Trust::Unreachable);
                tracing::warn!("GameServer list: no answer within {:?}; retrying", self.timeout);
                return None;
            }
        };
        self.metrics.kube_call("list", "ok");
        self.writer.apply_watcher_event(&Event::Init);
        for gs in listed.items {
            self.note(&gs);
            self.writer.apply_watcher_event(&Event::InitApply(gs));
        }
        self.writer.apply_watcher_event(&Event::InitDone);
        self.health.synced.store(true, Ordering::Release);
        self.health.set(Trust::Fresh);
        Some(listed.metadata.resource_version.unwrap_or_default())
    }

    /// Watches from `from` until the request ends.
    async fn watch(&mut self, from: String) -> Ended {
        let params = WatchParams::default().labels(&self.selector).timeout(WATCH_SECONDS);
        let stream = match tokio::time::timeout(self.timeout, self.api.watch(&params, &from)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(kube::Error::Api(status))) if status.code == 410 => return Ended::Expired,
            Ok(Err(e)) => {
                self.failed("watch", &e);
                return Ended::Failed(from);
            }
            Err(_) => {
                self.metrics.kube_call("watch", "timeout");
                self.health.set(Trust::Unreachable);
                return Ended::Failed(from);
            }
        };
        self.metrics.kube_call("watch", "ok");
        self.health.set(Trust::Fresh);
        let mut version = from;
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(gs) | WatchEvent::Modified(gs)) => {
                    version = gs.metadata.resource_version.clone().unwrap_or(version);
                    self.note(&gs);
                    self.writer.apply_watcher_event(&Event::Apply(gs));
                }
                Ok(WatchEvent::Deleted(gs)) => {
                    version = gs.metadata.resource_version.clone().unwrap_or(version);
                    self.writer.apply_watcher_event(&Event::Delete(gs));
                }
                Ok(WatchEvent::Bookmark(bookmark)) => version = bookmark.metadata.resource_version,
                Ok(WatchEvent::Error(status)) if status.code == 410 => return Ended::Expired,
                Ok(WatchEvent::Error(status)) => {
                    self.failed("watch", &kube::Error::Api(status));
                    return Ended::Failed(version);
                }
                // One event line not understood: skip it, keep watching.
                Err(kube::Error::SerdeError(e)) => {
                    self.metrics.kube_objects_skipped.with_label_values(&["event"]).inc();
                    tracing::warn!(error = %e, "GameServer watch event not understood; skipped");
                }
                Err(kube::Error::Api(status)) if status.code == 410 => return Ended::Expired,
                Err(e) => {
                    self.failed("watch", &e);
                    return Ended::Failed(version);
                }
            }
        }
        Ended::Resume(version)
    }

    fn failed(&self, verb: &str, error: &kube::Error) {
        self.metrics.kube_call(verb, "error");
        self.health.failed(error);
        tracing::warn!(error = %error_summary(error), "GameServer {verb} failed; retrying");
    }

    /// Counts a GameServer that cannot be understood, and names it once.
    fn note(&mut self, gs: &GameServer) {
        let Some(why) = &gs.undecodable else { return };
        self.metrics
            .kube_objects_skipped
            .with_label_values(&["GameServer"])
            .inc();
        if self.named.insert(gs.name().to_string()) {
            let why = clip(why.clone(), ERROR_TEXT);
            tracing::warn!(gameserver = gs.name(), error = %why, "GameServer not understood; it counts as nothing");
        }
    }
}

/// Waits `backoff`, jittered; the next one.
async fn pause(backoff: Duration) -> Duration {
    use rand::Rng;
    let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
    tokio::time::sleep(jittered).await;
    (backoff * 2).min(MAX_BACKOFF)
}
