//! Placement: which worker may run a task. Pure functions over the workers' capacity, what
//! their active tasks hold, their attributes and the job's constraints; the state machine in
//! [`super::state`] calls them and records the result.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::model::{Usage, WorkerRec};
use iris_wire::proto::controller::{Constraint, ConstraintOp};
use iris_wire::proto::{
    AttributeValue, DeviceConfig, ResourceSpecProto, WorkerMetadata, attribute_value, device_config,
};

/// What one task of a job needs from a worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Need {
    pub cpu_millicores: i64,
    pub memory_bytes: i64,
    pub gpus: i64,
    /// A TPU variant the worker's device must have.
    pub tpu_variant: Option<String>,
    /// A GPU variant the worker's device must have (when named).
    pub gpu_variant: Option<String>,
}

impl Need {
    pub fn of(res: Option<&ResourceSpecProto>) -> Need {
        let Some(res) = res else { return Need::default() };
        let cpu_millicores =
            if res.cpu_millicores > 0 { i64::from(res.cpu_millicores) } else { i64::from(res.cpu) * 1000 };
        let mut need = Need { cpu_millicores, memory_bytes: res.memory_bytes, ..Default::default() };
        match res.device.as_ref().and_then(|d| d.device.as_ref()) {
            Some(device_config::Device::Gpu(g)) => {
                need.gpus = i64::from(g.count.max(1));
                need.gpu_variant = (!g.variant.is_empty()).then(|| g.variant.clone());
            }
            Some(device_config::Device::Tpu(t)) => {
                need.tpu_variant = Some(t.variant.clone()).filter(|v| !v.is_empty());
                if need.tpu_variant.is_none() {
                    need.tpu_variant = Some(String::new());
                }
            }
            _ => {}
        }
        need
    }

    pub fn usage(&self) -> Usage {
        Usage { cpu_millicores: self.cpu_millicores, memory_bytes: self.memory_bytes, gpus: self.gpus }
    }
}

/// A worker's whole capacity.
pub fn capacity(m: &WorkerMetadata) -> Usage {
    let gpus = match m.device.as_ref().and_then(|d| d.device.as_ref()) {
        Some(device_config::Device::Gpu(g)) => i64::from(g.count.max(m.gpu_count)),
        _ => i64::from(m.gpu_count),
    };
    Usage { cpu_millicores: i64::from(m.cpu_count) * 1000, memory_bytes: m.memory_bytes, gpus }
}

/// Why `need` does not fit into `free` on a worker with `metadata`, naming the request's field;
/// `None` when it fits.
pub fn misfit(need: &Need, free: Usage, metadata: &WorkerMetadata) -> Option<String> {
    if need.cpu_millicores > free.cpu_millicores {
        return Some(format!("resources.cpu: {} millicores wanted, {} free", need.cpu_millicores, free.cpu_millicores));
    }
    if need.memory_bytes > free.memory_bytes {
        return Some(format!("resources.memory_bytes: {} wanted, {} free", need.memory_bytes, free.memory_bytes));
    }
    if need.gpus > free.gpus {
        return Some(format!("resources.device.gpu.count: {} wanted, {} free", need.gpus, free.gpus));
    }
    let device = metadata.device.as_ref().and_then(|d: &DeviceConfig| d.device.as_ref());
    if let Some(v) = &need.gpu_variant
        && let Some(device_config::Device::Gpu(g)) = device
        && !g.variant.is_empty()
        && &g.variant != v
    {
        return Some(format!("resources.device.gpu.variant: {v:?} wanted, the worker has {:?}", g.variant));
    }
    if let Some(v) = &need.tpu_variant {
        match device {
            Some(device_config::Device::Tpu(t)) if v.is_empty() || &t.variant == v => {}
            _ => return Some(format!("resources.device.tpu.variant: {v:?} wanted, the worker has no such TPU")),
        }
    }
    None
}

fn number(v: &AttributeValue) -> Option<f64> {
    match v.value.as_ref()? {
        attribute_value::Value::IntValue(i) => Some(*i as f64),
        attribute_value::Value::FloatValue(f) => Some(*f),
        attribute_value::Value::StringValue(s) => s.parse().ok(),
    }
}

fn compare(a: &AttributeValue, b: &AttributeValue) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return x.partial_cmp(&y);
    }
    match (a.value.as_ref()?, b.value.as_ref()?) {
        (attribute_value::Value::StringValue(x), attribute_value::Value::StringValue(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Whether a worker's attributes satisfy one constraint. A missing attribute satisfies only
/// NE and NOT_EXISTS.
pub fn satisfies(c: &Constraint, attrs: &std::collections::HashMap<String, AttributeValue>) -> bool {
    let op = ConstraintOp::try_from(c.op).unwrap_or(ConstraintOp::Eq);
    let have = attrs.get(&c.key);
    let want = c.value.clone().unwrap_or_default();
    match op {
        ConstraintOp::Exists => have.is_some(),
        ConstraintOp::NotExists => have.is_none(),
        ConstraintOp::Eq => have.is_some_and(|h| compare(h, &want) == Some(Ordering::Equal)),
        ConstraintOp::Ne => have.is_none_or(|h| compare(h, &want) != Some(Ordering::Equal)),
        ConstraintOp::Gt => have.and_then(|h| compare(h, &want)) == Some(Ordering::Greater),
        ConstraintOp::Ge => matches!(have.and_then(|h| compare(h, &want)), Some(Ordering::Greater | Ordering::Equal)),
        ConstraintOp::Lt => have.and_then(|h| compare(h, &want)) == Some(Ordering::Less),
        ConstraintOp::Le => matches!(have.and_then(|h| compare(h, &want)), Some(Ordering::Less | Ordering::Equal)),
    }
}

/// Checks a constraint is well formed; the error names the field.
pub fn validate_constraint(i: usize, c: &Constraint) -> Result<(), (String, String)> {
    let field = |f: &str| format!("constraints[{i}].{f}");
    if c.key.is_empty() {
        return Err((field("key"), "must not be empty".into()));
    }
    let op = ConstraintOp::try_from(c.op).map_err(|_| (field("op"), format!("unknown operator {}", c.op)))?;
    let value = c.value.as_ref().and_then(|v| v.value.as_ref());
    match op {
        ConstraintOp::Exists | ConstraintOp::NotExists => Ok(()),
        ConstraintOp::Eq | ConstraintOp::Ne if value.is_none() => Err((field("value"), "is required".into())),
        ConstraintOp::Gt | ConstraintOp::Ge | ConstraintOp::Lt | ConstraintOp::Le
            if c.value.as_ref().and_then(number).is_none() =>
        {
            Err((field("value"), "must be a number for an ordering operator".into()))
        }
        _ => Ok(()),
    }
}

/// A worker that may take tasks now: healthy, not suspect, and not out of disk space.
pub fn schedulable(w: &WorkerRec, now_ms: i64) -> bool {
    w.rec.healthy && w.suspect_until_ms <= now_ms && disk_pressure(w).is_none()
}

/// Why the worker takes no task for now, when it reports a filesystem below its hard disk
/// threshold (until a heartbeat says space returned).
pub fn disk_pressure(w: &WorkerRec) -> Option<String> {
    use iris_wire::proto::attribute_value::Value;
    match w.metadata.attributes.get(iris_wire::cluster::DISK_PRESSURE_ATTRIBUTE)?.value.as_ref()? {
        Value::StringValue(why) => Some(why.clone()),
        _ => Some("disk pressure".into()),
    }
}

/// The free resources of a worker.
pub fn free(w: &WorkerRec) -> Usage {
    let cap = capacity(&w.metadata);
    Usage {
        cpu_millicores: cap.cpu_millicores - w.used.cpu_millicores,
        memory_bytes: cap.memory_bytes - w.used.memory_bytes,
        gpus: cap.gpus - w.used.gpus,
    }
}

/// Places one task: the eligible worker with the fewest tasks (ties: most free CPU), among
/// `workers` (already filtered by the caller's group). `extra` is what this pass has already
/// put on each worker but not yet recorded. Returns the worker id, or why none fits.
pub fn place<'a>(
    need: &Need,
    constraints: &[Constraint],
    workers: impl Iterator<Item = &'a WorkerRec>,
    extra: &BTreeMap<String, (Usage, usize)>,
    now_ms: i64,
) -> Result<String, String> {
    let mut best: Option<(&WorkerRec, usize, i64)> = None;
    let mut reason = String::from("no healthy worker is registered");
    // The most telling reason wins: a worker that would fit but takes nothing now says more
    // than one the constraints rule out, and one without room says most.
    let mut rank = 0;
    let mut why = |r: u8, text: String| {
        if r >= rank {
            rank = r;
            reason = text;
        }
    };
    for w in workers {
        if let Some(c) = constraints.iter().find(|c| !satisfies(c, &w.metadata.attributes)) {
            if w.rec.healthy {
                why(1, format!("no worker satisfies the constraint on {:?}", c.key));
            }
            continue;
        }
        if !schedulable(w, now_ms) {
            if let Some(p) = disk_pressure(w).filter(|_| w.rec.healthy) {
                why(2, format!("worker {} takes no task for now: {p}", w.rec.worker_id));
            } else if w.rec.healthy && !w.last_dispatch_error.is_empty() {
                why(2, format!("dispatch to worker {} failed: {}", w.rec.worker_id, w.last_dispatch_error));
            }
            continue;
        }
        let mut free = free(w);
        let mut count = w.tasks.len();
        if let Some((u, n)) = extra.get(&w.rec.worker_id) {
            free.cpu_millicores -= u.cpu_millicores;
            free.memory_bytes -= u.memory_bytes;
            free.gpus -= u.gpus;
            count += n;
        }
        if let Some(misfit) = misfit(need, free, &w.metadata) {
            why(3, format!("no worker has room: {misfit}"));
            continue;
        }
        let better = match best {
            None => true,
            Some((_, c, f)) => count < c || (count == c && free.cpu_millicores > f),
        };
        if better {
            best = Some((w, count, free.cpu_millicores));
        }
    }
    best.map(|(w, _, _)| w.rec.worker_id.clone()).ok_or(reason)
}

/// Why no registered healthy worker could ever run the task (its whole capacity, device or
/// constraints), or `None` when one could. A launch records it as the job's status message: the
/// job still waits (a worker that fits may register, e.g. brought by an autoscaler, as in Iris)
/// until its `scheduling_timeout_seconds`, if it has one, ends it UNSCHEDULABLE.
pub fn never_fits<'a>(
    need: &Need,
    constraints: &[Constraint],
    workers: impl Iterator<Item = &'a WorkerRec>,
) -> Option<String> {
    let mut reason = None;
    for w in workers.filter(|w| w.rec.healthy) {
        if let Some(c) = constraints.iter().find(|c| !satisfies(c, &w.metadata.attributes)) {
            reason.get_or_insert_with(|| format!("no worker satisfies the constraint on {:?}", c.key));
            continue;
        }
        match misfit(need, capacity(&w.metadata), &w.metadata) {
            Some(why) => reason = Some(format!("no worker could ever fit it: {why} at most")),
            None => return None,
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkerRecord;

    fn worker(id: &str, cpus: i32, zone: &str) -> WorkerRec {
        let mut m = WorkerMetadata { cpu_count: cpus, memory_bytes: 1 << 30, ..Default::default() };
        m.attributes
            .insert("zone".into(), AttributeValue { value: Some(attribute_value::Value::StringValue(zone.into())) });
        m.attributes.insert("rank".into(), AttributeValue { value: Some(attribute_value::Value::IntValue(3)) });
        WorkerRec {
            rec: WorkerRecord { worker_id: id.into(), healthy: true, ..Default::default() },
            metadata: m,
            ..Default::default()
        }
    }

    fn c(key: &str, op: ConstraintOp, v: Option<attribute_value::Value>) -> Constraint {
        Constraint { key: key.into(), op: op as i32, value: v.map(|v| AttributeValue { value: Some(v) }) }
    }

    #[test]
    fn every_operator() {
        let w = worker("w", 1, "a");
        let s = |x: &str| Some(attribute_value::Value::StringValue(x.into()));
        let i = |x: i64| Some(attribute_value::Value::IntValue(x));
        let a = &w.metadata.attributes;
        assert!(satisfies(&c("zone", ConstraintOp::Eq, s("a")), a));
        assert!(!satisfies(&c("zone", ConstraintOp::Eq, s("b")), a));
        assert!(satisfies(&c("zone", ConstraintOp::Ne, s("b")), a));
        assert!(satisfies(&c("gpu", ConstraintOp::Ne, s("b")), a));
        assert!(satisfies(&c("zone", ConstraintOp::Exists, None), a));
        assert!(satisfies(&c("gpu", ConstraintOp::NotExists, None), a));
        assert!(!satisfies(&c("zone", ConstraintOp::NotExists, None), a));
        assert!(satisfies(&c("rank", ConstraintOp::Gt, i(2)), a));
        assert!(satisfies(&c("rank", ConstraintOp::Ge, i(3)), a));
        assert!(!satisfies(&c("rank", ConstraintOp::Lt, i(3)), a));
        assert!(satisfies(&c("rank", ConstraintOp::Le, i(3)), a));
        assert!(!satisfies(&c("missing", ConstraintOp::Gt, i(0)), a));
        assert!(validate_constraint(0, &c("rank", ConstraintOp::Gt, s("x"))).is_err());
        assert!(validate_constraint(0, &c("", ConstraintOp::Exists, None)).is_err());
    }

    #[test]
    fn placement_spreads_and_respects_room_and_constraints() {
        let mut a = worker("a", 2, "a");
        let b = worker("b", 2, "b");
        a.tasks.insert("x".into());
        let need = Need { cpu_millicores: 1000, ..Default::default() };
        let ws = [a.clone(), b.clone()];
        assert_eq!(place(&need, &[], ws.iter(), &BTreeMap::new(), 0).unwrap(), "b");
        let zone_a = [c("zone", ConstraintOp::Eq, Some(attribute_value::Value::StringValue("a".into())))];
        assert_eq!(place(&need, &zone_a, ws.iter(), &BTreeMap::new(), 0).unwrap(), "a");
        let big = Need { cpu_millicores: 3000, ..Default::default() };
        let err = place(&big, &[], ws.iter(), &BTreeMap::new(), 0).unwrap_err();
        assert!(err.contains("resources.cpu"), "{err}");
        assert!(never_fits(&big, &[], ws.iter()).unwrap().contains("resources.cpu"));
        assert!(never_fits(&need, &[], ws.iter()).is_none());
    }

    #[test]
    fn a_worker_under_disk_pressure_gets_no_task_until_it_says_space_returned() {
        let mut full = worker("full", 8, "a");
        let idle = worker("idle", 1, "a");
        full.metadata.attributes.insert(
            iris_wire::cluster::DISK_PRESSURE_ATTRIBUTE.into(),
            iris_wire::cluster::attribute_text("disk: 38 MiB free on state/workdirs (minimum 50 MiB)"),
        );
        let need = Need { cpu_millicores: 1000, ..Default::default() };
        // The full worker has more room, but takes nothing.
        assert_eq!(place(&need, &[], [full.clone(), idle.clone()].iter(), &BTreeMap::new(), 0).unwrap(), "idle");
        let err = place(&need, &[], [full.clone()].iter(), &BTreeMap::new(), 0).unwrap_err();
        assert_eq!(err, "worker full takes no task for now: disk: 38 MiB free on state/workdirs (minimum 50 MiB)");
        assert!(never_fits(&need, &[], [full.clone()].iter()).is_none(), "it is not impossible, only not now");
        full.metadata.attributes.remove(iris_wire::cluster::DISK_PRESSURE_ATTRIBUTE);
        assert_eq!(place(&need, &[], [full, idle].iter(), &BTreeMap::new(), 0).unwrap(), "full");
    }
}
