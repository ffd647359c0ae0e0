//! Desired state in an embedded SQLite database (`<data-dir>/ferry.db`): services, their
//! revisions and traffic. WAL with synchronous=FULL, each change one transaction.

use ferry_api::gateway::TrafficTarget;
use ferry_api::service::ServiceSpec;
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
             CREATE INDEX IF NOT EXISTS revisions_by_service ON revisions(service);",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
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
        Ok(n == 1)
    }

    /// Replaces the service-level spec (scaling bounds) without a new revision.
    pub fn set_service_spec(&self, name: &str, spec: &ServiceSpec, now_ms: u64) -> Result<bool> {
        let s = serde_json::to_string(spec).expect("spec serialises");
        let n = self.conn().execute(
            "UPDATE services SET spec = ?2, updated_ms = ?3 WHERE name = ?1",
            params![name, s, now_ms as i64],
        )?;
        Ok(n == 1)
    }

    pub fn delete_service(&self, name: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM revisions WHERE service = ?1", params![name])?;
        let n = tx.execute("DELETE FROM services WHERE name = ?1", params![name])?;
        tx.commit()?;
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
