//! Usage intake: turns the agent's instance reports and the gateway's per-second stats into
//! usage events (docs/billing.md). Pure: the callers write what these return to the store,
//! which makes every write idempotent by event id.
//!
//! - An instance event opens when the agent first reports the instance Starting or Ready (at
//!   the agent's `at_ms`) and closes when it reports it Stopped or Failed. CPU and memory are
//!   the instance's allocation, which control chose.
//! - Every other report of an open instance (and every resource sample) refreshes its
//!   `last_seen_ms`, where a restarted control closes the events its predecessor left open.
//! - Requests and egress come per revision per second; ids `req-<service>-<revision>-<at_ms>`
//!   and `egr-<service>-<revision>-<at_ms>`; zero counts are skipped.

use crate::state::Instance;
use ferry_api::agent::{InstanceState, InstanceStatus};
use ferry_api::gateway::RevisionStats;
use ferry_metering::{UsageEvent, UsageKind};

/// The usage event id of an instance.
pub fn instance_event_id(instance: &str) -> String {
    format!("inst-{instance}")
}

/// What an instance report means for its usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceUsage {
    /// Open the event (a no-op when it exists).
    Open {
        id: String,
        service: String,
        instance: String,
        start_ms: u64,
        cpu_millis: u32,
        memory_bytes: u64,
    },
    /// Close the event at `stop_ms` (a no-op when closed or never opened).
    Close { id: String, stop_ms: u64 },
    /// The instance was alive at `at_ms`.
    Seen { id: String, at_ms: u64 },
}

/// Reads an agent status report. `inst` is control's record of the instance; without one
/// nothing is billed (control did not start it, and tells the agent to stop it).
pub fn from_status(inst: Option<&Instance>, st: &InstanceStatus) -> Option<InstanceUsage> {
    let inst = inst?;
    let id = instance_event_id(&st.instance_id);
    Some(match st.state {
        InstanceState::Starting | InstanceState::Ready => InstanceUsage::Open {
            id,
            service: inst.service.clone(),
            instance: st.instance_id.clone(),
            start_ms: st.at_ms,
            cpu_millis: inst.cpu.millis(),
            memory_bytes: inst.memory.bytes(),
        },
        InstanceState::Stopped | InstanceState::Failed => InstanceUsage::Close {
            id,
            stop_ms: st.at_ms,
        },
        InstanceState::Pending | InstanceState::Draining => InstanceUsage::Seen {
            id,
            at_ms: st.at_ms,
        },
    })
}

/// The requests and egress events of one gateway stats report.
pub fn from_stats(at_ms: u64, revisions: &[RevisionStats]) -> Vec<UsageEvent> {
    let mut out = Vec::new();
    for r in revisions {
        let key = format!("{}-{}-{at_ms}", r.service, r.revision);
        if r.requests > 0 {
            out.push(UsageEvent {
                id: format!("req-{key}"),
                kind: UsageKind::Requests {
                    service: r.service.clone(),
                    at_ms,
                    count: r.requests,
                },
            });
        }
        if r.egress_bytes > 0 {
            out.push(UsageEvent {
                id: format!("egr-{key}"),
                kind: UsageKind::Egress {
                    service: r.service.clone(),
                    at_ms,
                    bytes: r.egress_bytes,
                },
            });
        }
    }
    out
}

/// Writes an instance's usage change; failures are logged (the event is lost, not the report).
pub(crate) fn apply(store: &crate::store::Store, u: &InstanceUsage) {
    let r = match u {
        InstanceUsage::Open {
            id,
            service,
            instance,
            start_ms,
            cpu_millis,
            memory_bytes,
        } => store
            .open_instance(id, service, instance, *start_ms, *cpu_millis, *memory_bytes)
            .map(|new| {
                if new {
                    tracing::debug!(event = %id, start_ms, "instance usage opened");
                }
            }),
        InstanceUsage::Close { id, stop_ms } => store.close_instance(id, *stop_ms).map(|closed| {
            if closed {
                tracing::debug!(event = %id, stop_ms, "instance usage closed");
            }
        }),
        InstanceUsage::Seen { id, at_ms } => store.touch_instances(&[(id.clone(), *at_ms)]),
    };
    if let Err(e) = r {
        tracing::error!(error = %e, "recording instance usage");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, UsageWindow};
    use ferry_api::{Cpu, Memory};

    fn inst(id: &str) -> Instance {
        Instance {
            id: id.into(),
            service: "hello".into(),
            revision: "hello-00001".into(),
            node: "n1".into(),
            state: InstanceState::Pending,
            address: None,
            started_ms: 0,
            cpu: Cpu(500),
            memory: Memory(128 << 20),
            reason: None,
            draining_since: None,
            stop_sent: false,
            in_flight: (0, 0),
        }
    }

    fn status(id: &str, state: InstanceState, at_ms: u64) -> InstanceStatus {
        InstanceStatus {
            instance_id: id.into(),
            node: "n1".into(),
            state,
            address: None,
            reason: None,
            at_ms,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ferry.db")).unwrap();
        (dir, s)
    }

    fn feed(s: &Store, i: &Instance, reports: &[(InstanceState, u64)]) {
        for (state, at) in reports {
            if let Some(u) = from_status(Some(i), &status(&i.id, *state, *at)) {
                apply(s, &u);
            }
        }
    }

    fn all(s: &Store) -> Vec<UsageEvent> {
        s.usage_events(UsageWindow::new(0, u64::MAX / 2)).unwrap()
    }

    #[test]
    fn status_maps_to_open_close_seen() {
        let i = inst("hello-00001-a");
        let open = from_status(Some(&i), &status(&i.id, InstanceState::Starting, 7)).unwrap();
        assert_eq!(
            open,
            InstanceUsage::Open {
                id: "inst-hello-00001-a".into(),
                service: "hello".into(),
                instance: "hello-00001-a".into(),
                start_ms: 7,
                cpu_millis: 500,
                memory_bytes: 128 << 20,
            }
        );
        assert!(matches!(
            from_status(Some(&i), &status(&i.id, InstanceState::Failed, 9)),
            Some(InstanceUsage::Close { stop_ms: 9, .. })
        ));
        assert!(matches!(
            from_status(Some(&i), &status(&i.id, InstanceState::Draining, 8)),
            Some(InstanceUsage::Seen { at_ms: 8, .. })
        ));
        assert_eq!(
            from_status(None, &status("x", InstanceState::Ready, 1)),
            None,
            "an instance control does not know is not billed"
        );
    }

    #[test]
    fn same_status_twice_counts_once_and_first_start_and_stop_win() {
        let (_d, s) = store();
        let i = inst("hello-00001-a");
        use InstanceState::*;
        feed(
            &s,
            &i,
            &[
                (Pending, 1_000),
                (Starting, 1_010),
                (Starting, 1_010),
                (Ready, 1_200),
                (Ready, 1_200),
                (Draining, 5_000),
                (Stopped, 6_050),
                (Stopped, 6_050),
                (Failed, 7_000),
                (Ready, 8_000),
            ],
        );
        let ev = all(&s);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            ev[0].kind,
            UsageKind::Instance {
                service: "hello".into(),
                instance: "hello-00001-a".into(),
                start_ms: 1_010,
                stop_ms: Some(6_050),
                cpu_millis: 500,
                memory_bytes: 128 << 20,
            }
        );
        assert_eq!(ev[0].id, "inst-hello-00001-a");
    }

    #[test]
    fn an_instance_that_never_started_is_not_billed() {
        let (_d, s) = store();
        let i = inst("hello-00001-b");
        feed(
            &s,
            &i,
            &[(InstanceState::Pending, 1), (InstanceState::Failed, 5)],
        );
        assert!(all(&s).is_empty());
    }

    #[test]
    fn restart_closes_open_instances_at_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        let s = Store::open(&path).unwrap();
        let a = inst("hello-00001-a");
        let b = inst("hello-00001-b");
        let c = inst("hello-00001-c");
        feed(&s, &a, &[(InstanceState::Ready, 1_000)]);
        feed(&s, &b, &[(InstanceState::Starting, 2_000)]);
        feed(
            &s,
            &c,
            &[(InstanceState::Ready, 500), (InstanceState::Stopped, 900)],
        );
        s.touch_instances(&[
            (instance_event_id(&a.id), 4_000),
            (instance_event_id(&a.id), 3_000), // older: ignored
            (instance_event_id(&c.id), 9_999), // closed: ignored
        ])
        .unwrap();
        drop(s);
        // A crash here, then control starts again.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.close_open_instances().unwrap(), 2);
        assert_eq!(s.close_open_instances().unwrap(), 0, "idempotent");
        let stops: Vec<(String, Option<u64>)> = all(&s)
            .into_iter()
            .map(|e| match e.kind {
                UsageKind::Instance { stop_ms, .. } => (e.id, stop_ms),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            stops,
            vec![
                ("inst-hello-00001-c".to_string(), Some(900)),
                ("inst-hello-00001-a".to_string(), Some(4_000)),
                (
                    "inst-hello-00001-b".to_string(),
                    Some(2_000),
                    // never seen after its start: closed at its start, bills one increment
                ),
            ]
        );
        // A late Stopped of the old process changes nothing.
        feed(&s, &a, &[(InstanceState::Stopped, 10_000)]);
        assert!(all(&s).iter().any(|e| matches!(
            e.kind,
            UsageKind::Instance {
                stop_ms: Some(4_000),
                ..
            }
        )));
    }

    fn stats(service: &str, rev: &str, requests: u64, egress: u64) -> RevisionStats {
        RevisionStats {
            service: service.into(),
            revision: rev.into(),
            avg_concurrency: 0.0,
            max_concurrency: 0,
            requests,
            queue_depth: 0,
            p99_latency_ms: 0.0,
            egress_bytes: egress,
            window_ms: 1000,
            instances: vec![],
        }
    }

    #[test]
    fn stats_become_idempotent_request_and_egress_events() {
        let (_d, s) = store();
        let report = [
            stats("hello", "hello-00001", 3, 300),
            stats("hello", "hello-00002", 0, 0),
            stats("web", "web-00001", 0, 50),
        ];
        let ev = from_stats(1_000, &report);
        let ids: Vec<&str> = ev.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "req-hello-hello-00001-1000",
                "egr-hello-hello-00001-1000",
                "egr-web-web-00001-1000"
            ]
        );
        assert_eq!(s.record_usage(&ev).unwrap(), 3);
        assert_eq!(s.record_usage(&ev).unwrap(), 0, "the same report twice");
        s.record_usage(&from_stats(2_000, &report[..1])).unwrap();
        let plan = ferry_metering::PricePlan::default();
        let r = ferry_metering::usage(&all(&s), &plan, 0, 10_000, Some("hello"), 10_000).unwrap();
        assert_eq!(r.services[0].requests, 6);
        assert_eq!(r.services[0].egress_bytes, 600);
    }

    #[test]
    fn window_selects_what_can_touch_the_range() {
        let (_d, s) = store();
        let m: ferry_metering::Month = "2026-11".parse().unwrap();
        let (start, end) = (m.start_ms(), m.end_ms());
        let i = inst("hello-00001-a");
        // Started last month, still open; one stopped before the range; one after it.
        feed(&s, &i, &[(InstanceState::Ready, start - 10)]);
        feed(
            &s,
            &inst("old"),
            &[(InstanceState::Ready, 1), (InstanceState::Stopped, 2)],
        );
        feed(&s, &inst("later"), &[(InstanceState::Ready, end)]);
        s.record_usage(&from_stats(start + 5, &[stats("a", "a-1", 1, 1)]))
            .unwrap();
        s.record_usage(&from_stats(start + 20_000, &[stats("a", "a-1", 1, 1)]))
            .unwrap();
        let ev = s
            .usage_events(UsageWindow::new(start + 10_000, end))
            .unwrap();
        let ids: Vec<&str> = ev.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "inst-hello-00001-a",
                // egress of the month before `from` counts for the free allowance
                &format!("egr-a-a-1-{}", start + 5),
                &format!("egr-a-a-1-{}", start + 20_000),
                &format!("req-a-a-1-{}", start + 20_000),
            ]
        );
    }
}
