//! Workers: the heartbeat (RegisterWorker), and the periodic tick that finds dead workers, moves their tasks once their fence has passed, and ends tasks past their scheduling timeout.

use std::collections::HashSet;

use super::{Effect, FENCE_MARGIN_MS, State, invalid};
use crate::ControllerError;
use crate::model::{WorkerRec, WorkerRecord, now_ms, task_terminal};
use iris_wire::proto::TaskState;
use iris_wire::proto::controller::{self as pc};

impl State {
    /// RegisterWorker (the heartbeat).
    pub fn register_worker(
        &mut self,
        r: pc::RegisterWorkerRequest,
    ) -> Result<pc::RegisterWorkerResponse, ControllerError> {
        if r.worker_id.is_empty() {
            return Err(invalid("worker_id", "must not be empty"));
        }
        if r.address.is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        let now = now_ms();
        let metadata = r.metadata.unwrap_or_default();
        let known = self.workers.contains_key(&r.worker_id);
        let timeout_ms = self.knobs.worker_timeout.as_millis() as i64;
        let w = self.workers.entry(r.worker_id.clone()).or_insert_with(|| WorkerRec {
            rec: WorkerRecord { worker_id: r.worker_id.clone(), registered_ms: now, ..Default::default() },
            ..Default::default()
        });
        if !known || !w.rec.healthy || w.rec.address != r.address || w.metadata != metadata {
            if known && !w.rec.healthy {
                tracing::info!(worker_id = %r.worker_id, "worker is back");
            }
            let moved = known && w.rec.address != r.address;
            w.rec.address = r.address.clone();
            w.metadata = metadata;
            w.rec.healthy = true;
            self.dirty.workers.insert(r.worker_id.clone());
            if moved {
                // A worker restarted on another port: its tasks (and their logs) are there now.
                let held: Vec<String> = w.tasks.iter().cloned().collect();
                for id in held {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.worker_address = r.address.clone();
                        self.dirty.tasks.insert(id);
                    }
                }
            }
        }
        w.rec.last_heartbeat_ms = now;
        let fence_ms = r.fence_ms.max(0);
        if w.rec.fence_ms != fence_ms {
            if fence_ms + FENCE_MARGIN_MS > timeout_ms {
                tracing::warn!(
                    worker_id = %r.worker_id,
                    "the worker's lease and its kill take {fence_ms} ms, more than the worker timeout of \
                     {timeout_ms} ms: its tasks move only once the lease has lapsed (lower its --lease)"
                );
            }
            w.rec.fence_ms = fence_ms;
            self.dirty.workers.insert(r.worker_id.clone());
        }
        if !known {
            tracing::info!(worker_id = %r.worker_id, address = %r.address, "worker registered");
            return Ok(pc::RegisterWorkerResponse {
                accepted: true,
                controller_address: String::new(),
                should_reset: true,
            });
        }
        let address = w.rec.address.clone();
        let running: HashSet<&str> = r.running_task_ids.iter().map(String::as_str).collect();
        for id in &r.running_task_ids {
            let ours = self.tasks.get(id).is_some_and(|t| t.worker_id == r.worker_id && !task_terminal(t.state));
            if !ours {
                self.effects.push(Effect::Kill {
                    worker_id: r.worker_id.clone(),
                    address: address.clone(),
                    task_id: id.clone(),
                });
            }
        }
        let held: Vec<String> =
            self.workers.get(&r.worker_id).map(|w| w.tasks.iter().cloned().collect()).unwrap_or_default();
        for id in held {
            if running.contains(id.as_str()) || self.verifying.contains(&id) {
                continue;
            }
            let Some(t) = self.tasks.get(&id) else { continue };
            // Only attempts the worker acknowledged a while ago: a RunTask may be in flight.
            if t.dispatched && now - t.dispatched_ms > 3000 {
                self.verifying.insert(id.clone());
                self.effects.push(Effect::Verify {
                    task_id: id.clone(),
                    attempt_id: t.attempt_id,
                    worker_id: r.worker_id.clone(),
                    address: address.clone(),
                });
            }
        }
        Ok(pc::RegisterWorkerResponse { accepted: true, controller_address: String::new(), should_reset: false })
    }

    /// Periodic work: dead workers, their tasks once their lease has lapsed, and scheduling
    /// timeouts.
    pub fn tick(&mut self) {
        let now = now_ms();
        let timeout = self.knobs.worker_timeout.as_millis() as i64;
        let dead: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.rec.healthy && now - w.rec.last_heartbeat_ms > timeout)
            .map(|w| w.rec.worker_id.clone())
            .collect();
        for id in dead {
            tracing::warn!(worker_id = %id, "no heartbeat for {:?}: the worker is dead", self.knobs.worker_timeout);
            if let Some(w) = self.workers.get_mut(&id) {
                w.rec.healthy = false;
                self.dirty.workers.insert(id.clone());
            }
        }
        // A dead worker's tasks may still run there until its lease has lapsed and its
        // supervisors have killed them (its fence): only then do they move.
        let lapsed: Vec<(String, i64)> = self
            .workers
            .values()
            .filter(|w| !w.rec.healthy && !w.tasks.is_empty())
            .filter(|w| {
                let fence = if w.rec.fence_ms > 0 { w.rec.fence_ms + FENCE_MARGIN_MS } else { 0 };
                now - w.rec.last_heartbeat_ms > timeout.max(fence)
            })
            .map(|w| (w.rec.worker_id.clone(), now - w.rec.last_heartbeat_ms))
            .collect();
        for (id, silent_ms) in lapsed {
            let tasks: Vec<String> =
                self.workers.get(&id).map(|w| w.tasks.iter().cloned().collect()).unwrap_or_default();
            let error = format!("worker {id} sent no heartbeat for {:.1} s", silent_ms as f64 / 1000.0);
            for t in tasks {
                self.end_attempt(&t, TaskState::WorkerFailed, 0, error.clone(), true, now);
            }
        }
        let expired: Vec<(String, String)> = self
            .pending
            .iter()
            .filter_map(|(_, id)| {
                let t = self.tasks.get(id)?;
                let job = self.jobs.get(&t.job_id)?;
                let limit = i64::from(job.request.scheduling_timeout_seconds) * 1000;
                (limit > 0 && now - t.pending_since_ms > limit).then(|| {
                    let why = if job.rec.status_message.is_empty() {
                        "no worker was free".to_string()
                    } else {
                        job.rec.status_message.clone()
                    };
                    (
                        id.clone(),
                        format!(
                            "not placed within scheduling_timeout_seconds={}: {why}",
                            job.request.scheduling_timeout_seconds
                        ),
                    )
                })
            })
            .collect();
        for (id, why) in expired {
            let job_id = self.tasks.get(&id).map(|t| t.job_id.clone()).unwrap_or_default();
            self.finish_task(&id, TaskState::Unschedulable, 0, why, now);
            self.update_job(&job_id, now);
        }
    }
}
