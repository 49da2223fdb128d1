//! Placement: one scheduling pass over the waiting tasks in arrival order, and coscheduling of a job's tasks within one attribute group.

use std::collections::{BTreeMap, HashSet};

use super::{MAX_LATENCIES, State, task_id};
use crate::model::{WorkerRec, job_terminal, now_ms};
use crate::scheduler::{self, Need};

impl State {
    /// One scheduling pass over the waiting tasks, in arrival order.
    pub fn schedule(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = now_ms();
        let queue: Vec<String> = self.pending.iter().map(|(_, id)| id.clone()).collect();
        let mut blocked: HashSet<String> = HashSet::new();
        for id in queue {
            let started = std::time::Instant::now();
            let Some(t) = self.tasks.get(&id) else { continue };
            if !self.pending_seq.contains_key(&id) {
                continue;
            }
            let job_id = t.job_id.clone();
            if blocked.contains(&job_id) {
                continue;
            }
            let Some(job) = self.jobs.get(&job_id) else { continue };
            if job_terminal(job.rec.state) {
                self.unqueue(&id);
                continue;
            }
            let group_by = job.request.coscheduling.as_ref().map(|c| c.group_by.clone()).unwrap_or_default();
            let need = Need::of(job.request.resources.as_ref());
            let placed = if group_by.is_empty() {
                scheduler::place(&need, &job.request.constraints, self.workers.values(), &BTreeMap::new(), now)
                    .map(|w| vec![(id.clone(), w)])
            } else {
                blocked.insert(job_id.clone());
                self.place_group(&job_id, &group_by, &need, now)
            };
            match placed {
                Ok(placements) => {
                    let n = placements.len().max(1) as u64;
                    for (tid, w) in placements {
                        self.assign(&tid, &w, now);
                    }
                    if self.placement_latencies_ns.len() < MAX_LATENCIES {
                        let each = started.elapsed().as_nanos() as u64 / n;
                        self.placement_latencies_ns.extend(std::iter::repeat_n(each, n as usize));
                    }
                    if let Some(job) = self.jobs.get_mut(&job_id)
                        && !job.rec.status_message.is_empty()
                    {
                        job.rec.status_message.clear();
                        self.dirty.jobs.insert(job_id.clone());
                    }
                }
                Err(reason) => {
                    blocked.insert(job_id.clone());
                    if let Some(job) = self.jobs.get_mut(&job_id)
                        && job.rec.status_message != reason
                    {
                        job.rec.status_message = reason;
                        self.dirty.jobs.insert(job_id.clone());
                    }
                }
            }
        }
    }

    /// Coscheduling: every waiting task of the job at once, on workers sharing one value of
    /// `group_by` (the value its running tasks already use, if any), or none of them.
    pub(super) fn place_group(
        &self,
        job_id: &str,
        group_by: &str,
        need: &Need,
        now: i64,
    ) -> Result<Vec<(String, String)>, String> {
        let Some(job) = self.jobs.get(job_id) else { return Err("the job is gone".into()) };
        let mut waiting = Vec::new();
        let mut fixed: Option<String> = None;
        for i in 0..job.rec.num_tasks {
            let id = task_id(job_id, i);
            let Some(t) = self.tasks.get(&id) else { continue };
            if self.pending_seq.contains_key(&id) {
                waiting.push(id);
            } else if t.active()
                && let Some(v) = self.workers.get(&t.worker_id).and_then(|w| w.metadata.attributes.get(group_by))
            {
                fixed = Some(format!("{v:?}"));
            }
        }
        let mut groups: BTreeMap<String, Vec<&WorkerRec>> = BTreeMap::new();
        for w in self.workers.values() {
            if let Some(v) = w.metadata.attributes.get(group_by) {
                groups.entry(format!("{v:?}")).or_default().push(w);
            }
        }
        let mut reason = format!("no workers have the attribute {group_by:?} to coschedule by");
        for (value, members) in groups {
            if fixed.as_ref().is_some_and(|f| *f != value) {
                continue;
            }
            let mut extra: BTreeMap<String, (super::super::model::Usage, usize)> = BTreeMap::new();
            let mut out = Vec::new();
            let mut ok = true;
            for id in &waiting {
                match scheduler::place(need, &job.request.constraints, members.iter().copied(), &extra, now) {
                    Ok(w) => {
                        let e = extra.entry(w.clone()).or_default();
                        let u = need.usage();
                        e.0.cpu_millicores += u.cpu_millicores;
                        e.0.memory_bytes += u.memory_bytes;
                        e.0.gpus += u.gpus;
                        e.1 += 1;
                        out.push((id.clone(), w));
                    }
                    Err(why) => {
                        reason =
                            format!("waiting for room for all {} tasks in one {group_by} group: {why}", waiting.len());
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Ok(out);
            }
        }
        Err(reason)
    }
}
