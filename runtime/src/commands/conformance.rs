//! `dprim conformance`: run the suite against the configured backend.

use super::check::MEMORY_NOTE;
use crate::cli::{ConformanceArgs, Ctx};
use crate::exit::{self, Failure, OK};
use crate::output::note;
use crate::tasks::cluster::Clusters;
use dprim::{Error, ErrorKind};
use dprim_conformance::{CaseReport, ConfigHarness, Outcome, RunOptions};
use serde_json::json;
use std::sync::Arc;

fn case_line(case: &CaseReport) -> String {
    let tag = match case.outcome {
        Outcome::Passed => "PASS",
        Outcome::Failed => "FAIL",
        Outcome::Skipped => "SKIP",
    };
    let mut line = format!("{tag} {} ({} ms)", case.name, case.millis);
    if !case.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&case.reason);
    }
    line
}

pub(crate) async fn run(ctx: &Ctx, args: ConformanceArgs) -> Result<u8, Failure> {
    let config = ctx.config()?;
    // Fail fast on a backend this build cannot open, before the suite starts.
    let registry = crate::registry();
    if !registry.kinds().contains(&config.backend.kind.as_str()) {
        crate::open_config(&config).await.map_err(Failure::new)?;
    }
    if !ctx.out.is_json() {
        note(&format!(
            "running the conformance suite against `{}` (each case in its own namespace)",
            config.backend.kind
        ));
        if config.backend.kind == "memory" {
            note(&format!("note: {MEMORY_NOTE}"));
        }
    }
    // The `tasks::` cases run supervisors and agents: in this process on
    // memory, otherwise as child processes of this binary on the same config.
    let clusters = Clusters::for_config(&config, ctx.config.as_deref()).map_err(Failure::new)?;
    let harness = Arc::new(
        ConfigHarness::new(registry, config.backend.clone()).with_task_clusters(Arc::new(clusters)),
    );
    let mut options = RunOptions {
        filter: args.filter.clone(),
        ..RunOptions::default()
    };
    if let Some(timeout) = args.case_timeout {
        options.case_timeout = timeout;
    }
    let out = ctx.out;
    let mut on_case = move |case: &CaseReport| {
        // A closed stdout must not stop the run; the report is still written.
        let _ = out.emit(
            &case_line(case),
            json!({
                "case": case.name,
                "outcome": case.outcome.as_str(),
                "reason": case.reason,
                "millis": case.millis,
                "contract": case.contract,
            }),
        );
    };
    let report = dprim_conformance::run(harness, options, &mut on_case).await;
    if report.cases.is_empty() {
        let mut failure = Failure::new(Error::invalid("no conformance case matched"));
        if let Some(filter) = &args.filter {
            failure = failure.hint(format!(
                "--filter `{filter}` matches no case name; case names look like `kv::cas_conflict`"
            ));
        }
        return Err(failure);
    }
    report.write_to(&args.report).map_err(|e| {
        Failure::new(
            Error::new(
                ErrorKind::Unexpected,
                format!("cannot write the report to `{}`", args.report.display()),
            )
            .with_source(e),
        )
    })?;
    let (passed, failed, skipped) = (report.passed(), report.failed(), report.skipped());
    if ctx.out.is_json() {
        let _ = ctx.out.emit(
            "",
            json!({
                "backend": report.backend,
                "suite_version": report.suite_version,
                "passed": passed,
                "failed": failed,
                "skipped": skipped,
                "report": args.report.display().to_string(),
            }),
        );
    } else {
        let _ = ctx.out.text(&format!("\n{}", report.table().trim_end()));
        let _ = ctx.out.text(&format!(
            "\nreport written to {} (report.json, report.md)",
            args.report.display()
        ));
    }
    if failed > 0 {
        Ok(exit::CONDITION)
    } else {
        Ok(OK)
    }
}
