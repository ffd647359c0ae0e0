//! Per-revision runtime state: in-flight requests per instance (RAII guards), the hold queue
//! count, and the stats window. One short `Mutex` per revision, never held across `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_api::gateway::{Endpoint, InstanceLoad, RevisionRoute, RevisionStats};
use tokio::sync::Notify;

use crate::routing;

/// Latency samples kept per window; beyond this, samples replace random older ones.
const MAX_SAMPLES: usize = 4096;

/// Revision states by service, then revision: looked up with borrowed names, so the request
/// path allocates nothing here once a revision has been seen.
#[derive(Default)]
pub struct Revisions {
    map: Mutex<HashMap<String, HashMap<String, Arc<RevState>>>>,
}

impl Revisions {
    pub fn get(&self, service: &str, revision: &str) -> Arc<RevState> {
        let mut map = self.map.lock().unwrap();
        if let Some(r) = map.get(service).and_then(|m| m.get(revision)) {
            return r.clone();
        }
        map.entry(service.to_string())
            .or_default()
            .entry(revision.to_string())
            .or_insert_with(|| Arc::new(RevState::new(service, revision)))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<RevState>> {
        self.map
            .lock()
            .unwrap()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// Wakes every held request (a new route table was published).
    pub fn wake_all(&self) {
        for r in self.all() {
            r.notify.notify_waiters();
        }
    }

    /// Drops state of revisions that are idle and no longer routed.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut map = self.map.lock().unwrap();
        for (s, revs) in map.iter_mut() {
            revs.retain(|r, st| keep(s, r) || Arc::strong_count(st) > 1 || !st.is_idle());
        }
        map.retain(|_, revs| !revs.is_empty());
    }
}

pub struct RevState {
    pub service: String,
    pub revision: String,
    /// Signalled when an in-flight request finishes (a slot may be free).
    pub notify: Notify,
    inner: Mutex<Inner>,
}

struct Inner {
    in_flight: HashMap<String, u32>,
    /// Of those, upgraded connections (WebSockets).
    upgraded: HashMap<String, u32>,
    total: u32,
    /// Tickets of held requests, oldest first.
    queue: VecDeque<u64>,
    next_ticket: u64,
    last_demand: Option<Instant>,
    // stats window
    window_start: Instant,
    last_change: Instant,
    area: f64,
    max: u32,
    requests: u64,
    latencies_ms: Vec<f64>,
    egress: u64,
}

impl RevState {
    fn new(service: &str, revision: &str) -> Self {
        let now = Instant::now();
        RevState {
            service: service.to_string(),
            revision: revision.to_string(),
            notify: Notify::new(),
            inner: Mutex::new(Inner {
                in_flight: HashMap::new(),
                upgraded: HashMap::new(),
                total: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
                last_demand: None,
                window_start: now,
                last_change: now,
                area: 0.0,
                max: 0,
                requests: 0,
                latencies_ms: Vec::new(),
                egress: 0,
            }),
        }
    }

    fn is_idle(&self) -> bool {
        let i = self.inner.lock().unwrap();
        i.total == 0 && i.queue.is_empty() && i.requests == 0
    }

    /// Takes a slot on the least loaded instance with room, skipping `exclude`. Held requests
    /// go first in arrival order: a request is admitted only while fewer requests ahead of it
    /// in the hold queue than there are free slots.
    pub fn acquire(
        self: &Arc<Self>,
        route: &RevisionRoute,
        admission: Admission,
        exclude: Option<&str>,
    ) -> Option<(InflightGuard, Endpoint)> {
        let mut i = self.inner.lock().unwrap();
        let loads: Vec<u32> = route
            .instances
            .iter()
            .map(|e| i.in_flight.get(&e.instance_id).copied().unwrap_or(0))
            .collect();
        let exclude = exclude.and_then(|x| route.instances.iter().position(|e| e.instance_id == x));
        let ahead = match admission {
            Admission::Arrival => Some(i.queue.len()),
            Admission::Held(t) => i.queue.iter().position(|&q| q == t),
            Admission::Retry => None,
        };
        if let Some(ahead) = ahead
            && ahead >= routing::free_slots(&loads, route.container_concurrency, exclude)
        {
            return None;
        }
        let idx = routing::pick_instance(
            &loads,
            route.container_concurrency,
            exclude,
            rand::random::<u32>() as usize,
        )?;
        let ep = route.instances[idx].clone();
        match i.in_flight.get_mut(&ep.instance_id) {
            Some(n) => *n += 1,
            None => {
                i.in_flight.insert(ep.instance_id.clone(), 1);
            }
        }
        let now = Instant::now();
        i.advance(now);
        i.total += 1;
        i.max = i.max.max(i.total);
        Some((
            InflightGuard {
                rev: self.clone(),
                instance_id: ep.instance_id.clone(),
                upgraded: false,
            },
            ep,
        ))
    }

    /// Joins the hold queue; `None` when `limit` requests already wait. Returns the guard
    /// (its ticket is the [`Admission::Held`] to acquire with) and the new waiting count.
    pub fn enqueue(self: &Arc<Self>, limit: u32) -> Option<(WaitGuard, u32)> {
        let mut i = self.inner.lock().unwrap();
        if i.queue.len() >= limit as usize {
            return None;
        }
        let ticket = i.next_ticket;
        i.next_ticket += 1;
        i.queue.push_back(ticket);
        i.last_demand = Some(Instant::now());
        Some((
            WaitGuard {
                rev: self.clone(),
                ticket,
            },
            i.queue.len() as u32,
        ))
    }

    /// The waiting count, when a periodic demand reminder is due (at most one per `every`).
    pub fn demand_due(&self, every: std::time::Duration) -> Option<u32> {
        let mut i = self.inner.lock().unwrap();
        let now = Instant::now();
        match i.last_demand {
            Some(t) if now.duration_since(t) < every => None,
            _ if i.queue.is_empty() => None,
            _ => {
                i.last_demand = Some(now);
                Some(i.queue.len() as u32)
            }
        }
    }

    pub fn record_request(&self) {
        self.inner.lock().unwrap().requests += 1;
    }

    pub fn record_latency(&self, ms: f64) {
        let mut i = self.inner.lock().unwrap();
        if i.latencies_ms.len() < MAX_SAMPLES {
            i.latencies_ms.push(ms);
        } else {
            let k = rand::random_range(0..i.latencies_ms.len());
            i.latencies_ms[k] = ms;
        }
    }

    pub fn add_egress(&self, n: u64) {
        self.inner.lock().unwrap().egress += n;
    }

    #[cfg(test)]
    pub fn in_flight_total(&self) -> u32 {
        self.inner.lock().unwrap().total
    }

    /// Closes the stats window at `now`; `None` when the revision saw nothing in it.
    pub fn take_stats(&self, now: Instant) -> Option<RevisionStats> {
        let mut i = self.inner.lock().unwrap();
        i.advance(now);
        let window = now.duration_since(i.window_start);
        let window_ms = window.as_millis() as u64;
        let waiting = i.queue.len() as u32;
        let active = i.requests > 0 || i.max > 0 || waiting > 0 || i.egress > 0;
        let stats = active.then(|| RevisionStats {
            service: self.service.clone(),
            revision: self.revision.clone(),
            avg_concurrency: if window.as_secs_f64() > 0.0 {
                i.area / window.as_secs_f64()
            } else {
                f64::from(i.total)
            },
            max_concurrency: i.max,
            requests: i.requests,
            queue_depth: waiting,
            p99_latency_ms: p99(&mut i.latencies_ms),
            egress_bytes: i.egress,
            window_ms,
            instances: {
                let mut v: Vec<InstanceLoad> = i
                    .in_flight
                    .iter()
                    .map(|(id, n)| InstanceLoad {
                        instance_id: id.clone(),
                        in_flight: *n,
                        upgraded: i.upgraded.get(id).copied().unwrap_or(0),
                    })
                    .collect();
                v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                v
            },
        });
        i.window_start = now;
        i.area = 0.0;
        i.max = i.total;
        i.requests = 0;
        i.latencies_ms.clear();
        i.egress = 0;
        stats
    }
}

impl Inner {
    /// Adds the in-flight area since the last change (time-weighted concurrency).
    fn advance(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last_change)
            .as_secs_f64();
        self.area += f64::from(self.total) * dt;
        self.last_change = now;
    }
}

fn p99(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((samples.len() as f64) * 0.99).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// One request in flight on one instance; dropping it frees the slot and wakes a held request.
pub struct InflightGuard {
    rev: Arc<RevState>,
    instance_id: String,
    upgraded: bool,
}

impl InflightGuard {
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The request became an upgraded connection (a WebSocket): counted apart, so a draining
    /// instance keeps it up to the WebSocket bound rather than the request timeout.
    pub fn mark_upgraded(&mut self) {
        if !self.upgraded {
            self.upgraded = true;
            *self
                .rev
                .inner
                .lock()
                .unwrap()
                .upgraded
                .entry(self.instance_id.clone())
                .or_insert(0) += 1;
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        {
            let mut i = self.rev.inner.lock().unwrap();
            if self.upgraded
                && let Some(n) = i.upgraded.get_mut(&self.instance_id)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    i.upgraded.remove(&self.instance_id);
                }
            }
            if let Some(n) = i.in_flight.get_mut(&self.instance_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    i.in_flight.remove(&self.instance_id);
                }
            }
            i.advance(Instant::now());
            i.total = i.total.saturating_sub(1);
        }
        self.rev.notify.notify_waiters();
    }
}

/// How a request asks for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Just arrived: behind everyone already held.
    Arrival,
    /// Held with this ticket.
    Held(u64),
    /// Already admitted once; its first instance refused the connection.
    Retry,
}

/// One request in the hold queue; dropping it leaves the queue.
pub struct WaitGuard {
    rev: Arc<RevState>,
    ticket: u64,
}

impl WaitGuard {
    pub fn admission(&self) -> Admission {
        Admission::Held(self.ticket)
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        {
            let mut i = self.rev.inner.lock().unwrap();
            if let Some(p) = i.queue.iter().position(|&q| q == self.ticket) {
                i.queue.remove(p);
            }
        }
        // The ones behind moved up.
        self.rev.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(n: usize, cc: u32) -> RevisionRoute {
        RevisionRoute {
            revision: "r1".into(),
            container_concurrency: cc,
            request_timeout_ms: 1000,
            max_body_bytes: 0,
            h2c: false,
            queue_limit: 2,
            instances: (0..n)
                .map(|k| Endpoint {
                    instance_id: format!("i{k}"),
                    address: format!("127.0.0.1:{}", 1000 + k).parse().unwrap(),
                })
                .collect(),
            start_failure: None,
        }
    }

    #[test]
    fn guards_respect_concurrency_and_release() {
        let rev = Arc::new(RevState::new("s", "r1"));
        let r = route(2, 1);
        let a = Admission::Arrival;
        let (g1, e1) = rev.acquire(&r, a, None).unwrap();
        let (g2, e2) = rev.acquire(&r, a, None).unwrap();
        assert_ne!(e1.instance_id, e2.instance_id);
        assert!(rev.acquire(&r, a, None).is_none());
        drop(g1);
        let (_g3, e3) = rev.acquire(&r, a, None).unwrap();
        assert_eq!(e3.instance_id, e1.instance_id);
        drop(g2);
        assert_eq!(rev.in_flight_total(), 1);
    }

    #[test]
    fn stats_list_in_flight_per_instance_with_upgrades_apart() {
        let rev = Arc::new(RevState::new("s", "r1"));
        let r = route(2, 0);
        let (g1, e1) = rev.acquire(&r, Admission::Retry, None).unwrap();
        let (mut g2, e2) = rev.acquire(&r, Admission::Retry, None).unwrap();
        g2.mark_upgraded();
        let s = rev.take_stats(Instant::now()).unwrap();
        let mut want = vec![
            InstanceLoad {
                instance_id: e1.instance_id.clone(),
                in_flight: 1,
                upgraded: 0,
            },
            InstanceLoad {
                instance_id: e2.instance_id.clone(),
                in_flight: 1,
                upgraded: 1,
            },
        ];
        want.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        assert_eq!(s.instances, want);
        drop((g1, g2));
        let s = rev.take_stats(Instant::now()).unwrap();
        assert!(s.instances.is_empty(), "{s:?}");
    }

    #[test]
    fn queue_limit_and_stats() {
        let rev = Arc::new(RevState::new("s", "r1"));
        let (w1, n1) = rev.enqueue(2).unwrap();
        let (_w2, n2) = rev.enqueue(2).unwrap();
        assert_eq!((n1, n2), (1, 2));
        assert!(rev.enqueue(2).is_none());
        drop(w1);
        let start = Instant::now();
        rev.record_request();
        rev.record_latency(5.0);
        let (g, _) = rev.acquire(&route(1, 0), Admission::Retry, None).unwrap();
        let s = rev.take_stats(start + Duration::from_millis(1000)).unwrap();
        assert_eq!(s.requests, 1);
        assert_eq!(s.queue_depth, 1);
        assert_eq!(s.max_concurrency, 1);
        assert_eq!(s.p99_latency_ms, 5.0);
        assert!(s.avg_concurrency > 0.0 && s.avg_concurrency <= 1.0);
        drop(g);
    }

    #[test]
    fn held_requests_go_first_in_order() {
        let rev = Arc::new(RevState::new("s", "r1"));
        let r = route(1, 2);
        let (w1, _) = rev.enqueue(10).unwrap();
        let (w2, _) = rev.enqueue(10).unwrap();
        let (w3, _) = rev.enqueue(10).unwrap();
        // Two free slots, three held: the third and any new arrival wait.
        assert!(rev.acquire(&r, w3.admission(), None).is_none());
        assert!(rev.acquire(&r, Admission::Arrival, None).is_none());
        let g1 = rev.acquire(&r, w1.admission(), None).unwrap();
        drop(w1);
        let g2 = rev.acquire(&r, w2.admission(), None).unwrap();
        drop(w2);
        assert!(rev.acquire(&r, w3.admission(), None).is_none());
        drop(g1);
        assert!(rev.acquire(&r, Admission::Arrival, None).is_none());
        let _g3 = rev.acquire(&r, w3.admission(), None).unwrap();
        drop(w3);
        drop(g2);
        assert!(rev.acquire(&r, Admission::Arrival, None).is_some());
    }

    #[test]
    fn p99_of_samples() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p99(&mut v), 99.0);
        assert_eq!(p99(&mut [7.0]), 7.0);
        assert_eq!(p99(&mut []), 0.0);
    }
}
