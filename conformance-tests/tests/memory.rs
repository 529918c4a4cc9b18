//! Runs every conformance case against the in-memory backend, one libtest
//! trial per case. Cases the backend cannot run are reported ignored, with
//! the reason.

use dprim::{BackendConfig, Registry};
use dprim_conformance::{cases, run_case, ConfigHarness, Harness, Outcome};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let args = Arguments::from_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("cannot start a tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let registry = Registry::new().register("memory", dprim_memory::constructor());
    let harness: Arc<dyn Harness> = Arc::new(ConfigHarness::new(registry, BackendConfig::memory()));
    let trials = cases()
        .into_iter()
        .map(|case| {
            let runtime = runtime.clone();
            let harness = harness.clone();
            Trial::ignorable_test(case.name, move || {
                let report = runtime.block_on(run_case(harness, &case, Duration::from_secs(60)));
                match report.outcome {
                    Outcome::Passed => Ok(Completion::Completed),
                    Outcome::Skipped => Ok(Completion::ignored_with(report.reason)),
                    Outcome::Failed => Err(Failed::from(format!(
                        "{}\n  contract: {}",
                        report.reason, report.contract
                    ))),
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
