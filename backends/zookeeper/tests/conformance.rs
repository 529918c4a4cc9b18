//! The whole conformance suite against a real standalone ZooKeeper started
//! by `scripts/zookeeper.sh` (on its own port, in its own directory).
//! `DPRIM_ZK_FILTER` runs only the cases whose name contains it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Registry};
use dprim_conformance::{run, ConfigHarness, RunOptions};
use std::sync::Arc;
use support::Servers;

const PORT: u16 = 2281;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_passes_on_standalone_zookeeper() {
    let servers = Servers::new("conformance", Some(PORT));
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"dprim-ci\"\nsession_ttl = \"2s\"\n"
    ))
    .unwrap();
    let registry = Registry::new().register("zookeeper", dprim_zookeeper::constructor());
    let harness = Arc::new(ConfigHarness::new(registry, config.backend));
    let options = RunOptions {
        filter: std::env::var("DPRIM_ZK_FILTER").ok(),
        ..RunOptions::default()
    };
    let report = run(harness, options, &mut |c| eprintln!("{c:?}")).await;
    eprintln!("{}", report.table());
    assert_eq!(report.failed(), 0, "{}", report.table());
}
