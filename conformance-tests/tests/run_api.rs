//! The runner API the CLI uses: filtering, the per-case callback, timeouts
//! and the report formats, against the in-memory backend.

use dprim::{BackendConfig, Registry};
use dprim_conformance::{run, ConfigHarness, Harness, Outcome, RunOptions, SUITE_VERSION};
use std::sync::Arc;
use std::time::Duration;

fn harness() -> Arc<dyn Harness> {
    let registry = Registry::new().register("memory", dprim_memory::constructor());
    Arc::new(ConfigHarness::new(registry, BackendConfig::memory()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_run_reports_every_selected_case() {
    let mut seen = Vec::new();
    let options = RunOptions {
        filter: Some("kv::cas".into()),
        ..RunOptions::default()
    };
    let report = run(harness(), options, &mut |c| seen.push(c.name.clone())).await;
    assert_eq!(report.backend, "memory");
    assert_eq!(report.suite_version, SUITE_VERSION);
    assert!(report.cases.len() >= 3, "{}", report.table());
    assert!(report.cases.iter().all(|c| c.name.starts_with("kv::cas")));
    assert_eq!(
        seen,
        report
            .cases
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(report.passed(), report.cases.len(), "{}", report.table());
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("json");
    assert_eq!(json["cases"][0]["outcome"], "passed");
    assert!(report.to_markdown().contains("`kv::cas_conflict`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_over_its_timeout_fails() {
    let options = RunOptions {
        filter: Some("session::stays_alive_without_action".into()),
        case_timeout: Duration::from_millis(300),
    };
    let report = run(harness(), options, &mut |_| {}).await;
    assert_eq!(report.cases.len(), 1);
    let case = &report.cases[0];
    assert_eq!(case.outcome, Outcome::Failed);
    assert!(
        case.reason.starts_with("timed out after 300ms"),
        "{}",
        case.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_cases_without_a_task_cluster_are_skipped_saying_why() {
    let options = RunOptions {
        filter: Some("tasks::".into()),
        ..RunOptions::default()
    };
    let report = run(harness(), options, &mut |_| {}).await;
    assert!(report.cases.len() >= 9, "{}", report.table());
    for case in &report.cases {
        assert_eq!(case.outcome, Outcome::Skipped, "{}", report.table());
        assert!(
            case.reason.contains("needs a task cluster")
                && case.reason.contains("dprim conformance"),
            "{}: {}",
            case.name,
            case.reason
        );
    }
}
