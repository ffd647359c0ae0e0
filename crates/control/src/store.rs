//! Desired state in an embedded SQLite database (`<data-dir>/ferry.db`): services, their
//! revisions and traffic, and the usage events billing rates (docs/billing.md). WAL with
//! synchronous=FULL, each change one transaction.

use ferry_api::gateway::TrafficTarget;
use ferry_api::service::ServiceSpec;
use ferry_metering::{UsageEvent, UsageKind};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database row {0}: {1}")]
    Corrupt(String, serde_json::Error),
}

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub name: String,
    pub spec: ServiceSpec,
    pub latest_revision: String,
    pub traffic: Vec<TrafficTarget>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// A deploy whose traffic moves once its revision has a ready instance.
    pub rollout_pending: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RevisionRecord {
    pub name: String,
    pub service: String,
    /// Pinned by digest.
    pub image: String,
    pub spec: ServiceSpec,
    pub created_ms: u64,
}

type ServiceRow = (String, String, String, String, i64, i64, bool);

pub struct Store {
    conn: Mutex<Connection>,
    /// Bumped by every write to services, revisions or traffic, so readers can cache them.
    desired_generation: std::sync::atomic::AtomicU64,
}

fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(what.to_string(), e))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS services(
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                latest_revision TEXT NOT NULL,
                traffic TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL,
                next_seq INTEGER NOT NULL,
                rollout_pending INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS revisions(
                name TEXT PRIMARY KEY,
                service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
                image TEXT NOT NULL,
                spec TEXT NOT NULL,
                created_ms INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS revisions_by_service ON revisions(service);
             -- Usage events keyed by their idempotent id. `t0` is start_ms (instance) or at_ms,
             -- `stop_ms` is NULL while an instance is open, `last_seen_ms` is when an open
             -- instance was last reported alive, `amount` is a count or bytes.
             CREATE TABLE IF NOT EXISTS usage_events(
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                service TEXT NOT NULL,
                instance TEXT,
                t0 INTEGER NOT NULL,
                stop_ms INTEGER,
                last_seen_ms INTEGER,
                cpu_millis INTEGER,
                memory_bytes INTEGER,
                amount INTEGER);
             CREATE INDEX IF NOT EXISTS usage_by_time ON usage_events(t0);
             CREATE INDEX IF NOT EXISTS usage_open ON usage_events(kind, stop_ms);
             CREATE INDEX IF NOT EXISTS usage_by_service ON usage_events(service, t0);",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
            desired_generation: Default::default(),
        })
    }

    /// Changes whenever desired state (services, revisions, traffic) was written.
    pub fn desired_generation(&self) -> u64 {
        self.desired_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bump(&self) {
        self.desired_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("database lock")
    }

    /// Creates the service or gives it a new revision; `traffic` moves to the new revision
    /// when `route_now`, else stays where it was (the rollout moves it once the revision is
    /// ready). Returns the new revision.
    pub fn deploy(
        &self,
        name: &str,
        spec: &ServiceSpec,
        pinned_image: &str,
        now_ms: u64,
        route_now: bool,
    ) -> Result<RevisionRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<(i64, String, i64)> = tx
            .query_row(
                "SELECT next_seq, traffic, created_ms FROM services WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let seq = existing.as_ref().map_or(1, |e| e.0);
        let revision = format!("{name}-{seq:05}");
        let spec_json = serde_json::to_string(spec).expect("spec serialises");
        let traffic = match (&existing, route_now) {
            (Some((_, t, _)), false) => t.clone(),
            _ => serde_json::to_string(&vec![TrafficTarget {
                revision: revision.clone(),
                percent: 100,
            }])
            .expect("traffic serialises"),
        };
        let created = existing.as_ref().map_or(now_ms as i64, |e| e.2);
        tx.execute(
            "INSERT INTO services(name, spec, latest_revision, traffic, created_ms, updated_ms, next_seq, rollout_pending)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, latest_revision = ?3, traffic = ?4,
               updated_ms = ?6, next_seq = ?7, rollout_pending = ?8",
            params![name, spec_json, revision, traffic, created, now_ms as i64, seq + 1, !route_now && existing.is_some()],
        )?;
        tx.execute(
            "INSERT INTO revisions(name, service, image, spec, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![revision, name, pinned_image, spec_json, now_ms as i64],
        )?;
        tx.commit()?;
        self.bump();
        Ok(RevisionRecord {
            name: revision,
            service: name.to_string(),
            image: pinned_image.to_string(),
            spec: spec.clone(),
            created_ms: now_ms,
        })
    }

    pub fn set_traffic(&self, name: &str, traffic: &[TrafficTarget], now_ms: u64) -> Result<bool> {
        let t = serde_json::to_string(traffic).expect("traffic serialises");
        let n = self.conn().execute(
            "UPDATE services SET traffic = ?2, updated_ms = ?3, rollout_pending = 0 WHERE name = ?1",
            params![name, t, now_ms as i64],
        )?;
        self.bump();
        Ok(n == 1)
    }

    /// Replaces the service-level spec (scaling bounds) without a new revision.
    pub fn set_service_spec(&self, name: &str, spec: &ServiceSpec, now_ms: u64) -> Result<bool> {
        let s = serde_json::to_string(spec).expect("spec serialises");
        let n = self.conn().execute(
            "UPDATE services SET spec = ?2, updated_ms = ?3 WHERE name = ?1",
            params![name, s, now_ms as i64],
        )?;
        self.bump();
        Ok(n == 1)
    }

    pub fn delete_service(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM revisions WHERE service = ?1", params![name])?;
        let n = tx.execute("DELETE FROM services WHERE name = ?1", params![name])?;
        tx.commit()?;
        self.bump();
        Ok(n == 1)
    }

    fn service_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServiceRow> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    }

    fn to_service(row: ServiceRow) -> Result<ServiceRecord> {
        let (name, spec, latest_revision, traffic, created, updated, pending) = row;
        Ok(ServiceRecord {
            spec: json(&format!("services/{name}"), &spec)?,
            traffic: json(&format!("services/{name}"), &traffic)?,
            name,
            latest_revision,
            created_ms: created as u64,
            updated_ms: updated as u64,
            rollout_pending: pending,
        })
    }

    pub fn service(&self, name: &str) -> Result<Option<ServiceRecord>> {
        let row = self
            .conn()
            .query_row(
                "SELECT name, spec, latest_revision, traffic, created_ms, updated_ms, rollout_pending FROM services WHERE name = ?1",
                params![name],
                Self::service_from_row,
            )
            .optional()?;
        row.map(Self::to_service).transpose()
    }

    pub fn services(&self) -> Result<Vec<ServiceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, spec, latest_revision, traffic, created_ms, updated_ms, rollout_pending FROM services ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], Self::service_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(Self::to_service).collect()
    }

    pub fn revisions(&self, service: &str) -> Result<Vec<RevisionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, service, image, spec, created_ms FROM revisions WHERE service = ?1 ORDER BY name",
        )?;
        let rows = stmt
            .query_map(params![service], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(name, service, image, spec, created)| {
                Ok(RevisionRecord {
                    spec: json(&format!("revisions/{name}"), &spec)?,
                    name,
                    service,
                    image,
                    created_ms: created as u64,
                })
            })
            .collect()
    }
}

/// The events rating needs for `[from_ms, to_ms)` (docs/billing.md, "Pass all events that
/// can touch the range").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWindow {
    pub from_ms: u64,
    pub to_ms: u64,
    /// Egress events from here (the first month of the range) count too: the free allowance
    /// is consumed in time order across the month.
    pub egress_from_ms: u64,
}

impl UsageWindow {
    pub fn new(from_ms: u64, to_ms: u64) -> UsageWindow {
        UsageWindow {
            from_ms,
            to_ms,
            egress_from_ms: ferry_metering::Month::containing(from_ms).start_ms(),
        }
    }
}

fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type UsageRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

impl Store {
    /// Records a requests or egress event; recording the same id again changes nothing.
    /// Instance events go through [`Store::open_instance`] and [`Store::close_instance`].
    /// Returns how many were new.
    pub fn record_usage(&self, events: &[UsageEvent]) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut new = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO usage_events(id, kind, service, t0, amount) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO NOTHING",
            )?;
            for e in events {
                let (kind, service, at, amount) = match &e.kind {
                    UsageKind::Requests {
                        service,
                        at_ms,
                        count,
                    } => ("requests", service, at_ms, count),
                    UsageKind::Egress {
                        service,
                        at_ms,
                        bytes,
                    } => ("egress", service, at_ms, bytes),
                    UsageKind::Instance { .. } => continue,
                };
                new +=
                    stmt.execute(params![e.id, kind, service, sql_u64(*at), sql_u64(*amount)])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Opens an instance event (`stop_ms` NULL) the first time; later calls for the same id
    /// change nothing. Returns whether it was new.
    pub fn open_instance(
        &self,
        id: &str,
        service: &str,
        instance: &str,
        start_ms: u64,
        cpu_millis: u32,
        memory_bytes: u64,
    ) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT INTO usage_events(id, kind, service, instance, t0, last_seen_ms, cpu_millis, memory_bytes)
             VALUES (?1, 'instance', ?2, ?3, ?4, ?4, ?5, ?6) ON CONFLICT(id) DO NOTHING",
            params![id, service, instance, sql_u64(start_ms), cpu_millis, sql_u64(memory_bytes)],
        )?;
        Ok(n == 1)
    }

    /// Closes an open instance event at `stop_ms` (never before its start); an event already
    /// closed keeps its first stop. Returns whether it closed one.
    pub fn close_instance(&self, id: &str, stop_ms: u64) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE usage_events SET stop_ms = MAX(t0, ?2), last_seen_ms = MAX(t0, ?2)
             WHERE id = ?1 AND kind = 'instance' AND stop_ms IS NULL",
            params![id, sql_u64(stop_ms)],
        )?;
        Ok(n == 1)
    }

    /// Notes that the open instances were alive at their times, in one transaction.
    pub fn touch_instances(&self, seen: &[(String, u64)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE usage_events SET last_seen_ms = ?2
                 WHERE id = ?1 AND kind = 'instance' AND stop_ms IS NULL AND last_seen_ms < ?2",
            )?;
            for (id, at) in seen {
                stmt.execute(params![id, sql_u64(*at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Closes every open instance event at the last time it was seen alive. Control calls it
    /// at start: the instances of an earlier control process are gone (an agent that starts
    /// afresh does not know them). Returns how many it closed.
    pub fn close_open_instances(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE usage_events SET stop_ms = MAX(t0, COALESCE(last_seen_ms, t0))
             WHERE kind = 'instance' AND stop_ms IS NULL",
            [],
        )?)
    }

    /// The newest instance of `service` started at `since_ms` or later — or `wanted`, if it is
    /// one of them — from the usage record, which outlives control's memory of instances.
    pub fn past_instance(
        &self,
        service: &str,
        since_ms: u64,
        wanted: Option<&str>,
    ) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT instance FROM usage_events
                 WHERE service = ?1 AND t0 >= ?2 AND kind = 'instance' AND instance IS NOT NULL
                   AND (?3 IS NULL OR instance = ?3)
                 ORDER BY t0 DESC LIMIT 1",
                params![service, sql_u64(since_ms), wanted],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The events that can touch `window`: instances overlapping it (open ones included),
    /// requests inside it, egress from the start of its first month to its end.
    pub fn usage_events(&self, w: UsageWindow) -> Result<Vec<UsageEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, kind, service, instance, t0, stop_ms, cpu_millis, memory_bytes, amount
             FROM usage_events
             WHERE (kind = 'instance' AND t0 < ?2 AND (stop_ms IS NULL OR stop_ms >= ?1))
                OR (kind = 'requests' AND t0 >= ?1 AND t0 < ?2)
                OR (kind = 'egress' AND t0 >= ?3 AND t0 < ?2)
             ORDER BY t0, id",
        )?;
        let rows = stmt
            .query_map(
                params![
                    sql_u64(w.from_ms),
                    sql_u64(w.to_ms),
                    sql_u64(w.egress_from_ms)
                ],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<UsageRow>>>()?;
        Ok(rows.into_iter().filter_map(usage_from_row).collect())
    }
}

fn usage_from_row(row: UsageRow) -> Option<UsageEvent> {
    let (id, kind, service, instance, t0, stop, cpu, mem, amount) = row;
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let kind = match kind.as_str() {
        "instance" => UsageKind::Instance {
            service,
            instance: instance.unwrap_or_default(),
            start_ms: u(t0),
            stop_ms: stop.map(u),
            cpu_millis: u32::try_from(cpu.unwrap_or(0)).unwrap_or(0),
            memory_bytes: u(mem.unwrap_or(0)),
        },
        "requests" => UsageKind::Requests {
            service,
            at_ms: u(t0),
            count: u(amount.unwrap_or(0)),
        },
        "egress" => UsageKind::Egress {
            service,
            at_ms: u(t0),
            bytes: u(amount.unwrap_or(0)),
        },
        other => {
            tracing::warn!(id = %id, kind = other, "usage event of unknown kind skipped");
            return None;
        }
    };
    Some(UsageEvent { id, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_revisions_traffic_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        let s = Store::open(&path).unwrap();
        let spec = ServiceSpec::new("r/x:v1");
        let r1 = s.deploy("hello", &spec, "r/x@sha256:1", 10, true).unwrap();
        assert_eq!(r1.name, "hello-00001");
        let r2 = s.deploy("hello", &spec, "r/x@sha256:2", 20, false).unwrap();
        assert_eq!(r2.name, "hello-00002");
        let svc = s.service("hello").unwrap().unwrap();
        assert_eq!(svc.latest_revision, "hello-00002");
        assert_eq!(
            svc.traffic[0].revision, "hello-00001",
            "traffic waits for the rollout"
        );
        assert!(svc.rollout_pending);
        assert_eq!(svc.created_ms, 10);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.revisions("hello").unwrap().len(), 2);
        assert!(s.delete_service("hello").unwrap());
        assert!(s.service("hello").unwrap().is_none());
        assert!(s.revisions("hello").unwrap().is_empty());
    }
}
