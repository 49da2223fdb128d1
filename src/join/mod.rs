//! The worker's side of the newest Iris controller (marin-iris 0.2.227): which wire generation a
//! controller speaks, `ControllerService/Register` retried every 5 s until accepted, and the
//! keep-alive that each Reconcile addressed to this worker resets. When no Reconcile came for
//! the keep-alive timeout the controller has long failed this worker over and run its attempts
//! elsewhere: every attempt is killed and the worker registers again, as Iris's worker does.
//! The January generation's side is [`crate::heartbeat`].

use std::sync::Arc;
use std::time::Duration;

use crate::proto::newest::iris::cluster::controller::{RegisterRequest, RegisterResponse};
use crate::proto::newest::iris::job::{self, AttributeValue, DeviceConfig, WorkerMetadata};
use crate::rpc::connect::{ConnectClient, ConnectError, Generation};
use crate::task::TaskManager;

pub mod push;
pub mod token;
pub mod worker_log;

/// Kept by the newest wire's Reconcile handler, which touches it (see [`crate::rpc::newest`]).
pub use crate::rpc::newest::KeepAlive;

const SERVICE: &str = "iris.cluster.ControllerService";
/// Iris's worker registers every 5 s until accepted.
pub const REGISTER_EVERY: Duration = Duration::from_secs(5);
/// Iris's `heartbeat_timeout`: no Reconcile for this long and the worker resets.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(600);
/// How long the generation probe waits for the controller.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Register's deadline (Iris's worker uses 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The `--iris-wire` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IrisWire {
    /// The January 2026 wire (RegisterWorker, RunTask, ...): also our CLI's and controller's.
    January,
    /// The newest wire (Register, Reconcile, logs pushed to Iris's log service).
    Newest,
    /// The controller's generation; January without a controller.
    #[default]
    Auto,
}

pub use crate::taskdir::IRIS_WIRE as RECORDED;

/// Settles `wire` against the controller: `Auto` asks it; the others are taken as they are.
/// Without a controller `Auto` is January. A controller that cannot be asked (it is down while
/// the worker restarts) does not hold the worker up, whose tasks keep running and whose port
/// must answer: the generation recorded in `state_dir` the last time is served, else January,
/// with a warning (`--iris-wire` forces one). Returns whether the controller answered.
pub async fn generation(
    wire: IrisWire,
    controller: Option<&ConnectClient>,
    state_dir: &std::path::Path,
) -> (Generation, bool) {
    match (wire, controller) {
        (IrisWire::January, _) | (IrisWire::Auto, None) => (Generation::January, false),
        (IrisWire::Newest, _) => (Generation::Newest, false),
        (IrisWire::Auto, Some(client)) => match probe(client).await {
            Some(generation) => {
                tracing::info!(controller = client.base(), ?generation, "the controller's wire generation");
                (generation, true)
            }
            None => {
                let recorded = recorded(state_dir);
                let generation = recorded.unwrap_or(Generation::January);
                tracing::warn!(
                    ?generation,
                    from = if recorded.is_some() { "the state directory (the last answer)" } else { "the default" },
                    "the controller could not be asked which wire it speaks; --iris-wire forces one"
                );
                (generation, false)
            }
        },
    }
}

/// The generation recorded in `state_dir`, if any.
pub fn recorded(state_dir: &std::path::Path) -> Option<Generation> {
    match std::fs::read_to_string(state_dir.join(RECORDED)).ok()?.trim() {
        "january" => Some(Generation::January),
        "newest" => Some(Generation::Newest),
        _ => None,
    }
}

/// Records the generation the controller answered (for a restart while it is down).
pub fn record(state_dir: &std::path::Path, generation: Generation) -> std::io::Result<()> {
    let name = match generation {
        Generation::January => "january",
        Generation::Newest => "newest",
    };
    let tmp = state_dir.join(format!("{RECORDED}.tmp"));
    crate::taskdir::write_private(&tmp, name.as_bytes())?;
    std::fs::rename(tmp, state_dir.join(RECORDED))
}

/// Which generation the controller answers: the newest one knows `Register` (an empty request
/// registers nothing: a worker without an id is refused), the January one has no such path.
/// `None` when the controller could not be asked.
pub async fn probe(client: &ConnectClient) -> Option<Generation> {
    let empty = RegisterRequest::default();
    match client.call::<_, RegisterResponse>(SERVICE, "Register", &empty, PROBE_TIMEOUT).await {
        Ok(_) => Some(Generation::Newest),
        Err(ConnectError::Status { code: tonic::Code::NotFound | tonic::Code::Unimplemented, .. }) => {
            Some(Generation::January)
        }
        // Any other Connect answer (unauthenticated, invalid_argument) is a controller that
        // has the method.
        Err(ConnectError::Status { .. }) => Some(Generation::Newest),
        Err(e) => {
            tracing::warn!(error = %e, "asking the controller which wire it speaks; retrying");
            None
        }
    }
}

/// Who this worker is, for Register.
#[derive(Debug, Clone)]
pub struct Registration {
    pub worker_id: String,
    /// host:port where the controller reaches this worker (it dials http://<address>).
    pub address: String,
    pub metadata: WorkerMetadata,
}

/// Registers, then watches the keep-alive; runs until the manager shuts down
/// ([`TaskManager::shutdown`]).
pub fn start(client: ConnectClient, me: Registration, manager: TaskManager, keepalive: Arc<KeepAlive>) {
    let background = manager.background().clone();
    background.spawn(async move {
        loop {
            register(&client, &me).await;
            keepalive.touch();
            keepalive.silence().await;
            tracing::warn!(
                timeout = ?keepalive.timeout(),
                "no Reconcile from the controller within the keep-alive: killing every attempt and registering again"
            );
            let _forgotten = manager.reset(manager.fence_mark()).await;
        }
    });
}

/// Calls Register every [`REGISTER_EVERY`] until the controller accepts.
async fn register(client: &ConnectClient, me: &Registration) {
    let req = RegisterRequest {
        address: me.address.clone(),
        metadata: Some(me.metadata.clone()),
        worker_id: me.worker_id.clone(),
        slice_id: String::new(),
        scale_group: string_attribute(&me.metadata, "scale-group").unwrap_or_default(),
    };
    loop {
        match client.call::<_, RegisterResponse>(SERVICE, "Register", &req, CALL_TIMEOUT).await {
            Ok(resp) if resp.accepted => {
                tracing::info!(controller = client.base(), worker_id = %me.worker_id, "registered with the controller");
                return;
            }
            Ok(_) => tracing::warn!(worker_id = %me.worker_id, "the controller refused the registration; retrying"),
            Err(e) => tracing::warn!(error = %e, "registering with the controller; retrying"),
        }
        tokio::time::sleep(REGISTER_EVERY).await;
    }
}

fn string_attribute(metadata: &WorkerMetadata, key: &str) -> Option<String> {
    match metadata.attributes.get(key)?.value.as_ref()? {
        job::attribute_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// This host as the newest controller schedules on it: CPUs, memory, the cache volume's size,
/// a CPU device, and the attributes Iris's worker always sends (`device-type`, `preemptible`)
/// plus the operator's `--attribute`s (which win).
pub fn host_metadata(ip_address: &str, disk_of: &std::path::Path, attributes: &[(String, String)]) -> WorkerMetadata {
    let january = crate::heartbeat::host_metadata(ip_address);
    let disk_bytes =
        nix::sys::statvfs::statvfs(disk_of).map(|s| s.blocks().saturating_mul(s.fragment_size()) as i64).unwrap_or(0);
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("device-type".to_string(), text("cpu"));
    attrs.insert("preemptible".to_string(), text("false"));
    for (k, v) in attributes {
        attrs.insert(k.clone(), value(v));
    }
    WorkerMetadata {
        hostname: january.hostname,
        ip_address: january.ip_address,
        cpu_count: january.cpu_count,
        memory_bytes: january.memory_bytes,
        disk_bytes,
        device: Some(DeviceConfig {
            device: Some(job::device_config::Device::Cpu(job::CpuDevice { variant: "cpu".into() })),
        }),
        attributes: attrs,
        ..Default::default()
    }
}

fn text(v: &str) -> AttributeValue {
    AttributeValue { value: Some(job::attribute_value::Value::StringValue(v.to_string())) }
}

/// An attribute from its text, as [`iris_wire::cluster::AttributeText`] reads it.
fn value(v: &str) -> AttributeValue {
    iris_wire::cluster::AttributeText::parse(v).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn without_a_controller_auto_is_january_and_forced_wires_stay() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        assert_eq!(generation(IrisWire::Auto, None, dir).await, (Generation::January, false));
        assert_eq!(generation(IrisWire::Newest, None, dir).await, (Generation::Newest, false));
        let unreachable = ConnectClient::new("http://127.0.0.1:9");
        assert_eq!(generation(IrisWire::January, Some(&unreachable), dir).await, (Generation::January, false));
    }

    #[tokio::test]
    async fn a_controller_that_cannot_be_asked_gets_the_recorded_generation() {
        let state = tempfile::tempdir().unwrap();
        let unreachable = ConnectClient::new("http://127.0.0.1:9");
        assert_eq!(generation(IrisWire::Auto, Some(&unreachable), state.path()).await, (Generation::January, false));
        record(state.path(), Generation::Newest).unwrap();
        assert_eq!(recorded(state.path()), Some(Generation::Newest));
        assert_eq!(generation(IrisWire::Auto, Some(&unreachable), state.path()).await, (Generation::Newest, false));
    }

    #[tokio::test]
    async fn the_keepalive_runs_out_only_after_a_timeout_without_touches() {
        let timeout = Duration::from_secs(2);
        let k = KeepAlive::new(timeout);
        let started = Instant::now();
        let waiter = tokio::spawn({
            let k = k.clone();
            async move { k.silence().await }
        });
        for _ in 0..3 {
            tokio::time::sleep(timeout / 4).await;
            assert!(!waiter.is_finished(), "touched within the timeout");
            k.touch();
        }
        let last_touch = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert!(last_touch.elapsed() >= timeout, "it ran out a whole timeout after the last touch");
        assert!(started.elapsed() >= timeout + 3 * timeout / 4);
    }

    #[test]
    fn metadata_says_cpu_and_not_preemptible_unless_told() {
        let m = host_metadata("10.0.0.1", std::path::Path::new("/"), &[("preemptible".into(), "true".into())]);
        assert_eq!(m.ip_address, "10.0.0.1");
        assert!(m.cpu_count >= 1 && m.memory_bytes > 0 && m.disk_bytes > 0);
        assert_eq!(string_attribute(&m, "device-type").as_deref(), Some("cpu"));
        assert_eq!(string_attribute(&m, "preemptible").as_deref(), Some("true"));
    }
}
