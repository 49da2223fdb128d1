//! Reconcile's rules as a pure function: the controller's desired set and the worker's
//! attempts in, what to do and what to report out. No I/O, so every rule is tested here
//! without root; the handler in [`super`] applies the actions to the task manager.
//!
//! The rules (Iris's `handle_reconcile`, marin-iris 0.2.227; docs/ARCHITECTURE.md, "Wire
//! generations"):
//! - `run` of a known uid: nothing (a terminal attempt is never restarted);
//! - `run` of an unknown uid with a spec: start it, unless a live attempt of the same task has
//!   an attempt id at least as high (then it is a duplicate, dropped and so reported MISSING);
//!   a live attempt with a lower id is superseded (killed);
//! - `run` of an unknown uid without a spec, or `stop` of an unknown uid: MISSING;
//! - `stop` of a known uid: kill it (SIGTERM, then SIGKILL), idempotent;
//! - a live attempt whose uid is not desired at all is a zombie: killed and reported this
//!   tick;
//! - observations for every desired uid and every zombie; terminal history the controller did
//!   not ask about is not reported.

use std::collections::{HashMap, HashSet};

use crate::proto::newest::iris::cluster::worker::{AttemptObservation, DesiredAttempt, desired_attempt::Intent};
use crate::proto::newest::iris::job::{RunTaskRequest, TaskState as WireState};
use crate::proto::newest::iris::time::Timestamp;
use crate::task::{TaskState, UidAttempt};

/// What the handler must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a new attempt from this spec (its `attempt_uid` is the desired uid).
    Start(Box<RunTaskRequest>),
    /// Kill the attempt `uid` (SIGTERM, then SIGKILL after the grace).
    Kill { uid: String, why: KillReason },
}

/// Why an attempt is killed (for the worker's log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The controller said `stop`.
    Stopped,
    /// A newer attempt of the same task was started.
    Superseded,
    /// Live, but the controller no longer wants it.
    Zombie,
}

/// The state a worker reports for one of its attempts: PENDING is BUILDING on this wire.
pub fn wire_state(s: TaskState) -> WireState {
    match s {
        TaskState::Pending | TaskState::Building => WireState::Building,
        TaskState::Running => WireState::Running,
        TaskState::Succeeded => WireState::Succeeded,
        TaskState::Failed => WireState::Failed,
        TaskState::Killed => WireState::Killed,
        TaskState::WorkerFailed => WireState::WorkerFailed,
    }
}

/// The observation of a local attempt.
pub fn observe(a: &UidAttempt) -> AttemptObservation {
    let terminal = a.state.is_terminal();
    AttemptObservation {
        attempt_uid: a.attempt_uid.clone(),
        state: wire_state(a.state) as i32,
        exit_code: a.exit_code,
        error: a.error.clone(),
        container_id: a.container_id.clone(),
        finished_at: (terminal && a.finished_at_ms > 0).then_some(Timestamp { epoch_ms: a.finished_at_ms }),
        status_message: a.status_message.clone(),
        ..Default::default()
    }
}

/// `{attempt_uid, MISSING}`: asked about an attempt the worker has no record or spec of.
pub fn missing(uid: &str) -> AttemptObservation {
    AttemptObservation { attempt_uid: uid.to_string(), state: WireState::Missing as i32, ..Default::default() }
}

/// The provisional observation of an attempt started in this tick (the handler replaces it
/// with the attempt's own once the task manager has it, or with FAILED when it refused it).
fn started(uid: &str) -> AttemptObservation {
    AttemptObservation { attempt_uid: uid.to_string(), state: WireState::Building as i32, ..Default::default() }
}

/// Applies the rules to `desired` (in the controller's order) against `local`.
pub fn reconcile(desired: &[DesiredAttempt], local: &[UidAttempt]) -> (Vec<Action>, Vec<AttemptObservation>) {
    let by_uid: HashMap<&str, &UidAttempt> = local.iter().map(|a| (a.attempt_uid.as_str(), a)).collect();
    // Live attempts per task: (attempt id, uid), including the ones started in this tick.
    let mut live: HashMap<String, Vec<(i32, String)>> = HashMap::new();
    for a in local.iter().filter(|a| !a.state.is_terminal()) {
        live.entry(a.task_id.clone()).or_default().push((a.attempt_id, a.attempt_uid.clone()));
    }
    let mut actions = Vec::new();
    let mut observed = Vec::new();
    let mut started_now: HashSet<String> = HashSet::new();
    let mut killed: HashSet<String> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for d in desired {
        let uid = d.attempt_uid.as_str();
        if uid.is_empty() || !seen.insert(uid) {
            // No uid is nothing to act on or answer; a uid twice is answered once.
            continue;
        }
        if let Some(a) = by_uid.get(uid) {
            if matches!(d.intent, Some(Intent::Stop(_))) && !a.state.is_terminal() && killed.insert(uid.to_string()) {
                actions.push(Action::Kill { uid: uid.to_string(), why: KillReason::Stopped });
            }
            observed.push(observe(a));
            continue;
        }
        let spec = match &d.intent {
            Some(Intent::Run(run)) => run.request.as_ref(),
            _ => None,
        };
        let Some(spec) = spec else {
            observed.push(missing(uid));
            continue;
        };
        let same_task = live.entry(spec.task_id.clone()).or_default();
        if same_task.iter().any(|(id, _)| *id >= spec.attempt_id) {
            // A live attempt at least as new: this one is a duplicate.
            observed.push(missing(uid));
            continue;
        }
        for (_, older) in same_task.iter() {
            if killed.insert(older.clone()) {
                actions.push(Action::Kill { uid: older.clone(), why: KillReason::Superseded });
            }
        }
        same_task.push((spec.attempt_id, uid.to_string()));
        let mut spec = spec.clone();
        spec.attempt_uid = uid.to_string();
        actions.push(Action::Start(Box::new(spec)));
        started_now.insert(uid.to_string());
        observed.push(started(uid));
    }
    for a in local.iter().filter(|a| !a.state.is_terminal() && !seen.contains(a.attempt_uid.as_str())) {
        if killed.insert(a.attempt_uid.clone()) {
            actions.push(Action::Kill { uid: a.attempt_uid.clone(), why: KillReason::Zombie });
        }
        observed.push(observe(a));
    }
    (actions, observed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::newest::iris::cluster::worker::{AttemptSpec, StopReason};

    fn local(uid: &str, task: &str, attempt: i32, state: TaskState) -> UidAttempt {
        UidAttempt {
            attempt_uid: uid.into(),
            task_id: task.into(),
            attempt_id: attempt,
            state,
            status_message: String::new(),
            exit_code: if state == TaskState::Failed { 3 } else { 0 },
            error: String::new(),
            started_at_ms: 1,
            finished_at_ms: if state.is_terminal() { 42 } else { 0 },
            container_id: format!("c-{uid}"),
            dir: Default::default(),
        }
    }

    fn run(uid: &str, spec: Option<(&str, i32)>) -> DesiredAttempt {
        DesiredAttempt {
            attempt_uid: uid.into(),
            intent: Some(Intent::Run(AttemptSpec {
                request: spec.map(|(task, attempt)| RunTaskRequest {
                    task_id: task.into(),
                    attempt_id: attempt,
                    ..Default::default()
                }),
            })),
        }
    }

    fn stop(uid: &str) -> DesiredAttempt {
        DesiredAttempt { attempt_uid: uid.into(), intent: Some(Intent::Stop(StopReason::Cancelled as i32)) }
    }

    fn states(obs: &[AttemptObservation]) -> Vec<(String, WireState)> {
        obs.iter().map(|o| (o.attempt_uid.clone(), WireState::try_from(o.state).unwrap())).collect()
    }

    fn uid(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn an_unknown_uid_with_a_spec_starts_and_is_reported_building() {
        let (actions, obs) = reconcile(&[run("u1", Some(("/j/0", 0)))], &[]);
        match &actions[..] {
            [Action::Start(spec)] => {
                assert_eq!(spec.task_id, "/j/0");
                assert_eq!(spec.attempt_uid, "u1", "the uid is the desired one");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(states(&obs), [(uid("u1"), WireState::Building)]);
    }

    #[test]
    fn a_known_uid_is_not_started_again_even_with_its_spec_resent() {
        for state in [TaskState::Running, TaskState::Succeeded] {
            let (actions, obs) = reconcile(&[run("u1", Some(("/j/0", 0)))], &[local("u1", "/j/0", 0, state)]);
            assert!(actions.is_empty(), "{state:?}: {actions:?}");
            assert_eq!(states(&obs), [(uid("u1"), wire_state(state))]);
        }
    }

    #[test]
    fn unknown_uids_without_a_spec_or_to_stop_are_missing() {
        let (actions, obs) = reconcile(&[run("u1", None), stop("u2")], &[]);
        assert!(actions.is_empty());
        assert_eq!(states(&obs), [(uid("u1"), WireState::Missing), (uid("u2"), WireState::Missing)]);
    }

    #[test]
    fn stop_kills_a_live_attempt_once_and_reports_its_state() {
        let (actions, obs) = reconcile(&[stop("u1")], &[local("u1", "/j/0", 0, TaskState::Running)]);
        assert_eq!(actions, [Action::Kill { uid: uid("u1"), why: KillReason::Stopped }]);
        assert_eq!(states(&obs), [(uid("u1"), WireState::Running)]);
        // An attempt that ended is reported terminal, with nothing more to do.
        let (actions, obs) = reconcile(&[stop("u1")], &[local("u1", "/j/0", 0, TaskState::Killed)]);
        assert!(actions.is_empty());
        assert_eq!(states(&obs), [(uid("u1"), WireState::Killed)]);
        assert_eq!(obs[0].finished_at, Some(Timestamp { epoch_ms: 42 }));
    }

    #[test]
    fn live_attempts_not_desired_are_zombies_killed_and_reported_terminal_ones_are_not() {
        let locals = [local("z", "/j/0", 0, TaskState::Running), local("old", "/j/1", 0, TaskState::Succeeded)];
        let (actions, obs) = reconcile(&[], &locals);
        assert_eq!(actions, [Action::Kill { uid: uid("z"), why: KillReason::Zombie }]);
        assert_eq!(states(&obs), [(uid("z"), WireState::Running)]);
    }

    #[test]
    fn a_newer_attempt_supersedes_a_live_older_one_and_an_older_one_is_dropped() {
        let locals = [local("a0", "/j/0", 0, TaskState::Running)];
        let (actions, obs) = reconcile(&[run("a0", None), run("a1", Some(("/j/0", 1)))], &locals);
        assert_eq!(actions[0], Action::Kill { uid: uid("a0"), why: KillReason::Superseded });
        assert!(matches!(&actions[1], Action::Start(s) if s.attempt_id == 1));
        assert_eq!(states(&obs), [(uid("a0"), WireState::Running), (uid("a1"), WireState::Building)]);

        let locals = [local("a1", "/j/0", 1, TaskState::Running)];
        let (actions, obs) = reconcile(&[run("a1", None), run("x", Some(("/j/0", 1)))], &locals);
        assert!(actions.is_empty(), "a duplicate of a live attempt is dropped: {actions:?}");
        assert_eq!(states(&obs), [(uid("a1"), WireState::Running), (uid("x"), WireState::Missing)]);
    }

    #[test]
    fn the_same_task_and_attempt_under_a_fresh_uid_runs_once_the_old_one_ended() {
        let locals = [local("old", "/j/0", 0, TaskState::Failed)];
        let (actions, obs) = reconcile(&[run("new", Some(("/j/0", 0)))], &locals);
        assert!(matches!(&actions[..], [Action::Start(s)] if s.attempt_uid == "new"));
        assert_eq!(states(&obs), [(uid("new"), WireState::Building)], "the old terminal one is not reported");
    }

    #[test]
    fn a_pending_attempt_is_reported_building() {
        let (_, obs) = reconcile(&[run("u", None)], &[local("u", "/j/0", 0, TaskState::Pending)]);
        assert_eq!(states(&obs), [(uid("u"), WireState::Building)]);
    }
}
