//! The whole conformance suite against a real nats-server started by
//! `scripts/nats.sh`. `DPRIM_CONFORMANCE_FILTER` narrows it to matching cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Registry};
use dprim_conformance::{run, ConfigHarness, RunOptions};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_passes_on_nats() {
    let servers = support::Servers::new("conformance", 4311);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"dprim-ci\"\nsession_ttl = \"2s\"\n",
        servers.port
    ))
    .unwrap();
    let harness = Arc::new(ConfigHarness::new(
        Registry::new().register("nats", dprim_nats::constructor()),
        config.backend,
    ));
    let options = RunOptions {
        filter: std::env::var("DPRIM_CONFORMANCE_FILTER").ok(),
        ..RunOptions::default()
    };
    let report = run(harness, options, &mut |c| {
        eprintln!("{:<55} {:?} {}ms {}", c.name, c.outcome, c.millis, c.reason);
    })
    .await;
    println!("{}", report.table());
    assert_eq!(report.failed(), 0, "{}", report.table());
}
