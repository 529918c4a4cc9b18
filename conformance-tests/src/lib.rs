//! dprim-conformance: the suite that checks a backend against the dprim contract.
//!
//! Every case checks one `# Behavior` sentence of the traits in `dprim` and
//! quotes it ([`Case::contract`]). A [`Harness`] opens the backend under test;
//! [`run`] gives each case a fresh, isolated namespace, runs the cases one
//! after another and collects a [`Report`] (pass / fail / skipped with the
//! reason), which can be printed as a table or written as JSON and Markdown.
//!
//! Cases that need something a backend does not declare (a capability such as
//! `kv.transactions`, or a fault hook such as `expire_session`) are reported
//! skipped, naming what is missing; they are never silently dropped.
//!
//! The `tasks::` cases are app-level scenarios: supervisors and agents
//! running real processes on the backend, driven through a [`TaskCluster`]
//! that the harness builds per case ([`Harness::task_clusters`]). A harness
//! without one gets them reported skipped, saying so; `dprim conformance`
//! provides one on every backend.
//!
//! # Use from a backend crate's test target
//! ```no_run
//! # async fn example(registry: dprim::Registry) {
//! use std::sync::Arc;
//! use dprim_conformance::{run, ConfigHarness, Harness, RunOptions};
//! let harness: Arc<dyn Harness> =
//!     Arc::new(ConfigHarness::new(registry, dprim::BackendConfig::memory()));
//! let report = run(harness, RunOptions::default(), &mut |case| println!("{}", case.name)).await;
//! assert_eq!(report.failed(), 0, "{}", report.table());
//! # }
//! ```
#![deny(missing_docs)]

mod cases;
mod cluster;
pub mod failover;
pub mod faults;
pub mod linearizability;
mod report;
mod util;
pub mod waiting;

pub use cluster::{AgentSpec, Launch, TaskCluster, TaskClusters};
pub use report::{CaseReport, Outcome, Report};

use async_trait::async_trait;
use dprim::{Backend, BackendConfig, Capabilities, Registry};
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Version of the suite, recorded in every report.
pub const SUITE_VERSION: &str = "0.1.0";

/// Opens clients of the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Backend kind for the report (e.g. "memory").
    fn backend_kind(&self) -> String;
    /// Opens a client of the backend rooted at `namespace`. Calling it twice with the
    /// same namespace gives two clients (connections) that see the same data.
    async fn open(&self, namespace: &str) -> dprim::Result<Backend>;

    /// What builds the supervisors and agents of the `tasks::` cases; `None`
    /// (the default) has those cases reported skipped.
    fn task_clusters(&self) -> Option<Arc<dyn TaskClusters>> {
        None
    }
}

/// A [`Harness`] that opens backends through a [`Registry`] from one [`BackendConfig`],
/// placing each case namespace under the config's own namespace
/// (`<config namespace>/<case namespace>`), so runs on a shared cluster stay
/// inside the namespace the operator gave.
#[derive(Clone)]
pub struct ConfigHarness {
    registry: Registry,
    config: BackendConfig,
    task_clusters: Option<Arc<dyn TaskClusters>>,
}

impl ConfigHarness {
    /// A harness opening `config` (with each case's namespace) through `registry`.
    pub fn new(registry: Registry, config: BackendConfig) -> Self {
        ConfigHarness {
            registry,
            config,
            task_clusters: None,
        }
    }

    /// The same harness, running the `tasks::` cases on clusters from
    /// `clusters`.
    pub fn with_task_clusters(mut self, clusters: Arc<dyn TaskClusters>) -> Self {
        self.task_clusters = Some(clusters);
        self
    }
}

impl fmt::Debug for ConfigHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigHarness")
            .field("registry", &self.registry)
            .field("config", &self.config)
            .field("task_clusters", &self.task_clusters.is_some())
            .finish()
    }
}

#[async_trait]
impl Harness for ConfigHarness {
    fn backend_kind(&self) -> String {
        self.config.kind.clone()
    }

    async fn open(&self, namespace: &str) -> dprim::Result<Backend> {
        self.registry
            .open(
                &self
                    .config
                    .with_namespace(format!("{}/{namespace}", self.config.namespace)),
            )
            .await
    }

    fn task_clusters(&self) -> Option<Arc<dyn TaskClusters>> {
        self.task_clusters.clone()
    }
}

/// How [`run`] runs the suite.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Run only cases whose name contains this substring.
    pub filter: Option<String>,
    /// A case still running after this long fails with "timed out after ...".
    pub case_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            filter: None,
            case_timeout: Duration::from_secs(60),
        }
    }
}

/// Something a case needs beyond the portable contract. A backend that does
/// not offer it gets the case reported skipped, naming the requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requirement {
    /// The `kv.linearizable` capability.
    KvLinearizable,
    /// The `kv.transactions` capability.
    KvTransactions,
    /// A `kv.watch_history` of at least this many changes.
    KvWatchHistory(usize),
    /// The `lock.fair` capability (FIFO waiters).
    LockFair,
    /// The `queue.fifo` capability.
    QueueFifo,
    /// The `queue.dead_letter` capability.
    QueueDeadLetter,
    /// The `expire_session` fault hook.
    FaultExpireSession,
    /// The `stall_session` fault hook.
    FaultStallSession,
    /// Supervisors and agents from the harness ([`Harness::task_clusters`]).
    TaskCluster,
}

impl Requirement {
    /// Why `backend` cannot run a case with this requirement; `None` if it can.
    ///
    /// [`Requirement::TaskCluster`] depends on the harness, not the
    /// backend: see [`Requirement::unmet_by`].
    pub fn unmet(&self, backend: &Backend) -> Option<String> {
        let caps = backend.capabilities();
        let missing = |name: &str| Some(format!("requires capability {name}"));
        match self {
            Requirement::KvLinearizable if !caps.kv.linearizable => missing("kv.linearizable"),
            Requirement::KvTransactions if !caps.kv.transactions => missing("kv.transactions"),
            Requirement::KvWatchHistory(n) if caps.kv.watch_history < *n => Some(format!(
                "requires capability kv.watch_history >= {n} (backend declares {})",
                caps.kv.watch_history
            )),
            Requirement::LockFair if !caps.lock.fair => missing("lock.fair"),
            Requirement::QueueFifo if !caps.queue.fifo => missing("queue.fifo"),
            Requirement::QueueDeadLetter if !caps.queue.dead_letter => missing("queue.dead_letter"),
            Requirement::FaultExpireSession if backend.faults().is_none() => {
                Some("requires fault hook expire_session (Backend::faults())".into())
            }
            Requirement::FaultStallSession if backend.faults().is_none() => {
                Some("requires fault hook stall_session (Backend::faults())".into())
            }
            _ => None,
        }
    }

    /// Why `harness` (with its opened `backend`) cannot run a case with this
    /// requirement; `None` if it can.
    pub fn unmet_by(&self, harness: &dyn Harness, backend: &Backend) -> Option<String> {
        match self {
            Requirement::TaskCluster if harness.task_clusters().is_none() => {
                Some(NO_TASK_CLUSTER.to_string())
            }
            _ => self.unmet(backend),
        }
    }
}

/// Why a `tasks::` case is skipped by a harness without task clusters.
const NO_TASK_CLUSTER: &str = "needs a task cluster (supervisors and agents running tasks): \
     the harness offers none (Harness::task_clusters); run the suite through \
     `dprim conformance`, which provides one on every backend";

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::KvLinearizable => f.write_str("kv.linearizable"),
            Requirement::KvTransactions => f.write_str("kv.transactions"),
            Requirement::KvWatchHistory(n) => write!(f, "kv.watch_history >= {n}"),
            Requirement::LockFair => f.write_str("lock.fair"),
            Requirement::QueueFifo => f.write_str("queue.fifo"),
            Requirement::QueueDeadLetter => f.write_str("queue.dead_letter"),
            Requirement::FaultExpireSession => f.write_str("fault hook expire_session"),
            Requirement::FaultStallSession => f.write_str("fault hook stall_session"),
            Requirement::TaskCluster => f.write_str("a task cluster"),
        }
    }
}

/// Why a case did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fail {
    /// The backend disagreed with the contract (or errored).
    Failed(String),
    /// The case cannot run on this backend; the reason names what is missing.
    Skipped(String),
}

/// What a case's body returns.
pub type CaseResult = Result<(), Fail>;

type CaseFn = fn(Ctx) -> BoxFuture<'static, CaseResult>;

/// One conformance case: one sentence of the contract, checked.
#[derive(Clone)]
pub struct Case {
    /// `<primitive>::<behaviour>`, e.g. `kv::cas_conflict`.
    pub name: &'static str,
    /// The contract sentence the case checks, quoted from the trait docs.
    pub contract: &'static str,
    /// What the backend must offer for the case to run.
    pub requires: &'static [Requirement],
    run: CaseFn,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("requires", &self.requires)
            .finish()
    }
}

/// What a running case gets: its backend client and ways to open more.
pub struct Ctx {
    /// The first client, rooted at the case's fresh namespace.
    pub backend: Backend,
    harness: Arc<dyn Harness>,
    namespace: String,
}

impl Ctx {
    /// Another client (a new connection) on the same namespace.
    pub async fn another_client(&self) -> dprim::Result<Backend> {
        self.harness.open(&self.namespace).await
    }

    /// A client of a different namespace: the case's namespace with `-suffix`
    /// appended to its last segment (a sibling, never nested inside it).
    pub async fn sibling_namespace(&self, suffix: &str) -> dprim::Result<Backend> {
        self.harness
            .open(&format!("{}-{suffix}", self.namespace))
            .await
    }

    /// A task cluster on the case's namespace, from the harness; skips the
    /// case when the harness has none.
    pub async fn task_cluster(&self) -> Result<Box<dyn TaskCluster>, Fail> {
        let clusters = self
            .harness
            .task_clusters()
            .ok_or_else(|| Fail::Skipped(NO_TASK_CLUSTER.to_string()))?;
        clusters
            .start(&self.backend)
            .await
            .map_err(|e| Fail::Failed(format!("could not start a task cluster: {e}")))
    }

    /// The case's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The backend's declared capabilities.
    pub fn caps(&self) -> &Capabilities {
        self.backend.capabilities()
    }

    /// A session TTL for cases that wait for expiry: the backend's minimum, but
    /// at least one second.
    pub fn session_ttl(&self) -> Duration {
        self.caps().session.min_ttl.max(Duration::from_secs(1))
    }
}

/// All cases, in a stable order.
pub fn cases() -> Vec<Case> {
    cases::all()
}

/// Runs the suite against `harness`, calling `on_case` after each case.
///
/// Cases run one after another, each in its own task (a panic fails that case
/// only) and its own namespace `conformance/<run id>.<case name>`.
pub async fn run(
    harness: Arc<dyn Harness>,
    options: RunOptions,
    on_case: &mut (dyn FnMut(&CaseReport) + Send),
) -> Report {
    let run_id = new_run_id();
    let mut reports = Vec::new();
    for case in cases() {
        if let Some(filter) = &options.filter {
            if !case.name.contains(filter.as_str()) {
                continue;
            }
        }
        let report = run_in(harness.clone(), &case, &run_id, options.case_timeout).await;
        on_case(&report);
        reports.push(report);
    }
    Report {
        backend: harness.backend_kind(),
        suite_version: SUITE_VERSION.to_string(),
        cases: reports,
    }
}

/// Runs one case in a fresh namespace and reports its outcome.
pub async fn run_case(
    harness: Arc<dyn Harness>,
    case: &Case,
    case_timeout: Duration,
) -> CaseReport {
    run_in(harness, case, &new_run_id(), case_timeout).await
}

fn new_run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The namespace of `case` in run `run_id`: one segment below `conformance`.
fn case_namespace(run_id: &str, case: &str) -> String {
    format!("conformance/{run_id}.{}", case.replace("::", "."))
}

async fn run_in(
    harness: Arc<dyn Harness>,
    case: &Case,
    run_id: &str,
    case_timeout: Duration,
) -> CaseReport {
    let started = Instant::now();
    let namespace = case_namespace(run_id, case.name);
    let outcome = run_body(harness, case, namespace, case_timeout).await;
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (outcome, reason) = match outcome {
        Ok(()) => (Outcome::Passed, String::new()),
        Err(Fail::Failed(reason)) => (Outcome::Failed, reason),
        Err(Fail::Skipped(reason)) => (Outcome::Skipped, reason),
    };
    CaseReport {
        name: case.name.to_string(),
        outcome,
        reason,
        millis,
        contract: case.contract.to_string(),
    }
}

async fn run_body(
    harness: Arc<dyn Harness>,
    case: &Case,
    namespace: String,
    case_timeout: Duration,
) -> CaseResult {
    if let Err(e) = dprim::Key::new(&namespace) {
        return Err(Fail::Failed(format!(
            "the case namespace `{namespace}` is not a valid key: {e}"
        )));
    }
    let deadline = tokio::time::Instant::now() + case_timeout;
    let backend = match tokio::time::timeout_at(deadline, harness.open(&namespace)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(Fail::Failed(format!(
                "could not open the backend at namespace `{namespace}`: {e}"
            )))
        }
        Err(_) => {
            return Err(Fail::Failed(format!(
                "timed out after {} opening the backend",
                humantime::format_duration(case_timeout)
            )))
        }
    };
    if let Some(reason) = case
        .requires
        .iter()
        .find_map(|r| r.unmet_by(harness.as_ref(), &backend))
    {
        return Err(Fail::Skipped(reason));
    }
    let ctx = Ctx {
        backend,
        harness,
        namespace,
    };
    let mut task = tokio::spawn((case.run)(ctx));
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(Fail::Failed(if join.is_panic() {
            let payload = join.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-text panic payload)".into());
            format!("panicked: {message}")
        } else {
            format!("case task was cancelled: {join}")
        })),
        Err(_) => {
            task.abort();
            Err(Fail::Failed(format!(
                "timed out after {}",
                humantime::format_duration(case_timeout)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_unique_and_well_formed() {
        let all = cases();
        assert!(all.len() >= 60, "only {} cases", all.len());
        let mut seen = std::collections::HashSet::new();
        for case in &all {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            let (primitive, behaviour) = case.name.split_once("::").expect("primitive::behaviour");
            assert!(
                ["keys", "kv", "session", "lock", "election", "pubsub", "queue", "tasks"]
                    .contains(&primitive),
                "{}",
                case.name
            );
            assert!(
                !behaviour.is_empty() && !behaviour.contains(':'),
                "{}",
                case.name
            );
            assert!(
                !case.contract.is_empty(),
                "{} quotes no contract",
                case.name
            );
            dprim::Key::new(case_namespace("0123abcd", case.name)).expect("namespace is a key");
        }
    }

    /// Every case quotes its sentence verbatim from the docs of `dprim`.
    #[test]
    fn contracts_are_quoted_from_the_trait_docs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../primitives/src");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return; // Not built inside the workspace.
        };
        let mut docs = String::new();
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).expect("read source");
            for line in text.lines() {
                let line = line.trim();
                if let Some(doc) = line
                    .strip_prefix("///")
                    .or_else(|| line.strip_prefix("//!"))
                {
                    docs.push_str(doc.trim());
                    docs.push(' ');
                }
            }
        }
        let docs = docs.split_whitespace().collect::<Vec<_>>().join(" ");
        for case in cases() {
            assert!(
                docs.contains(case.contract),
                "{}: contract not found verbatim in the dprim docs: {}",
                case.name,
                case.contract
            );
        }
    }
}
