//! The controller's state in an embedded SQLite file (`<state-dir>/controller.db`): one row per
//! job, task, worker and endpoint. The controller keeps everything in memory and writes the
//! rows an operation changed in one transaction before it answers, so a `kill -9` loses no
//! acknowledged change and a restart resumes from the file.

use std::path::Path;

use prost::Message;
use rusqlite::{Connection, params};

use super::model::{EndpointRec, Job, JobRecord, Task, WorkerRec, WorkerRecord};
use iris_wire::proto::WorkerMetadata;
use iris_wire::proto::controller::LaunchJobRequest;

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the controller database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("{what} in the controller database: {source}")]
    Sql { what: &'static str, source: rusqlite::Error },
    #[error("decoding the stored {what} {id}: {reason}")]
    Decode { what: &'static str, id: String, reason: String },
}

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { what, source }
}

/// Everything the file holds.
#[derive(Default)]
pub struct Loaded {
    pub jobs: Vec<Job>,
    pub tasks: Vec<Task>,
    pub workers: Vec<WorkerRec>,
    pub endpoints: Vec<EndpointRec>,
}

/// One batch of changed rows.
#[derive(Default)]
pub struct Batch<'a> {
    pub new_jobs: Vec<&'a Job>,
    pub jobs: Vec<&'a JobRecord>,
    pub deleted_jobs: Vec<&'a str>,
    pub tasks: Vec<&'a Task>,
    pub workers: Vec<&'a WorkerRec>,
    pub endpoints: Vec<&'a EndpointRec>,
    pub deleted_endpoints: Vec<&'a str>,
}

impl Batch<'_> {
    pub fn is_empty(&self) -> bool {
        self.new_jobs.is_empty()
            && self.jobs.is_empty()
            && self.deleted_jobs.is_empty()
            && self.tasks.is_empty()
            && self.workers.is_empty()
            && self.endpoints.is_empty()
            && self.deleted_endpoints.is_empty()
    }
}

/// The open database.
pub struct Store {
    conn: Connection,
    /// Rows written since opening (for the write-amplification figure).
    pub rows_written: u64,
    pub transactions: u64,
}

impl Store {
    /// Opens (or creates) `<dir>/controller.db`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("controller.db");
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| {
            open_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("creating {}: {e}", dir.display())),
            ))
        })?;
        let conn = Connection::open(&path).map_err(open_err)?;
        // WAL + synchronous=NORMAL: a commit survives a killed process (the WAL is written
        // before the commit returns); only a power loss may drop the last transactions.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, request BLOB NOT NULL, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, record TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks(job_id);
             CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, metadata BLOB NOT NULL, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS endpoints (endpoint_id TEXT PRIMARY KEY, record TEXT NOT NULL);",
        )
        .map_err(open_err)?;
        Ok(Store { conn, rows_written: 0, transactions: 0 })
    }

    /// Reads every row.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut out = Loaded::default();
        let mut st = self.conn.prepare("SELECT job_id, request, record FROM jobs").map_err(sql("reading jobs"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))
            .map_err(sql("reading jobs"))?;
        for row in rows {
            let (id, request, record) = row.map_err(sql("reading jobs"))?;
            let request = LaunchJobRequest::decode(request.as_slice()).map_err(|e| StoreError::Decode {
                what: "job request",
                id: id.clone(),
                reason: e.to_string(),
            })?;
            let rec: JobRecord = serde_json::from_str(&record).map_err(|e| StoreError::Decode {
                what: "job",
                id: id.clone(),
                reason: e.to_string(),
            })?;
            out.jobs.push(Job { request, rec });
        }
        let mut st = self.conn.prepare("SELECT task_id, record FROM tasks").map_err(sql("reading tasks"))?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(sql("reading tasks"))?;
        for row in rows {
            let (id, record) = row.map_err(sql("reading tasks"))?;
            out.tasks.push(serde_json::from_str(&record).map_err(|e| StoreError::Decode {
                what: "task",
                id,
                reason: e.to_string(),
            })?);
        }
        let mut st =
            self.conn.prepare("SELECT worker_id, metadata, record FROM workers").map_err(sql("reading workers"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))
            .map_err(sql("reading workers"))?;
        for row in rows {
            let (id, metadata, record) = row.map_err(sql("reading workers"))?;
            let metadata = WorkerMetadata::decode(metadata.as_slice()).map_err(|e| StoreError::Decode {
                what: "worker metadata",
                id: id.clone(),
                reason: e.to_string(),
            })?;
            let rec: WorkerRecord = serde_json::from_str(&record).map_err(|e| StoreError::Decode {
                what: "worker",
                id,
                reason: e.to_string(),
            })?;
            out.workers.push(WorkerRec { rec, metadata, ..Default::default() });
        }
        let mut st =
            self.conn.prepare("SELECT endpoint_id, record FROM endpoints").map_err(sql("reading endpoints"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql("reading endpoints"))?;
        for row in rows {
            let (id, record) = row.map_err(sql("reading endpoints"))?;
            out.endpoints.push(serde_json::from_str(&record).map_err(|e| StoreError::Decode {
                what: "endpoint",
                id,
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Writes a batch in one transaction.
    pub fn write(&mut self, b: &Batch<'_>) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(sql("starting a transaction"))?;
        let mut rows = 0u64;
        for id in &b.deleted_jobs {
            tx.execute("DELETE FROM tasks WHERE job_id = ?1", params![id]).map_err(sql("deleting a job's tasks"))?;
            tx.execute("DELETE FROM jobs WHERE job_id = ?1", params![id]).map_err(sql("deleting a job"))?;
            rows += 1;
        }
        {
            let mut st = tx
                .prepare_cached("INSERT OR REPLACE INTO jobs (job_id, request, record) VALUES (?1, ?2, ?3)")
                .map_err(sql("writing a job"))?;
            for j in &b.new_jobs {
                st.execute(params![j.rec.job_id, j.request.encode_to_vec(), to_json(&j.rec)])
                    .map_err(sql("writing a job"))?;
                rows += 1;
            }
            let mut st =
                tx.prepare_cached("UPDATE jobs SET record = ?2 WHERE job_id = ?1").map_err(sql("updating a job"))?;
            for j in &b.jobs {
                st.execute(params![j.job_id, to_json(j)]).map_err(sql("updating a job"))?;
                rows += 1;
            }
            let mut st = tx
                .prepare_cached("INSERT OR REPLACE INTO tasks (task_id, job_id, record) VALUES (?1, ?2, ?3)")
                .map_err(sql("writing a task"))?;
            for t in &b.tasks {
                st.execute(params![t.task_id, t.job_id, to_json(t)]).map_err(sql("writing a task"))?;
                rows += 1;
            }
            let mut st = tx
                .prepare_cached("INSERT OR REPLACE INTO workers (worker_id, metadata, record) VALUES (?1, ?2, ?3)")
                .map_err(sql("writing a worker"))?;
            for w in &b.workers {
                st.execute(params![w.rec.worker_id, w.metadata.encode_to_vec(), to_json(&w.rec)])
                    .map_err(sql("writing a worker"))?;
                rows += 1;
            }
            let mut st = tx
                .prepare_cached("INSERT OR REPLACE INTO endpoints (endpoint_id, record) VALUES (?1, ?2)")
                .map_err(sql("writing an endpoint"))?;
            for e in &b.endpoints {
                st.execute(params![e.endpoint_id, to_json(e)]).map_err(sql("writing an endpoint"))?;
                rows += 1;
            }
            let mut st = tx
                .prepare_cached("DELETE FROM endpoints WHERE endpoint_id = ?1")
                .map_err(sql("deleting an endpoint"))?;
            for id in &b.deleted_endpoints {
                st.execute(params![id]).map_err(sql("deleting an endpoint"))?;
                rows += 1;
            }
        }
        tx.commit().map_err(sql("committing"))?;
        self.rows_written += rows;
        self.transactions += 1;
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Task;

    #[test]
    fn rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let job = Job {
            request: LaunchJobRequest { name: "j".into(), ..Default::default() },
            rec: JobRecord { job_id: "j".into(), num_tasks: 1, ..Default::default() },
        };
        let task = Task { task_id: "j/task-0".into(), job_id: "j".into(), attempt_id: 2, ..Default::default() };
        s.write(&Batch { new_jobs: vec![&job], tasks: vec![&task], ..Default::default() }).unwrap();
        drop(s);
        let loaded = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(loaded.jobs[0].request.name, "j");
        assert_eq!(loaded.tasks[0].attempt_id, 2);
    }
}
