//! `dprim`: portable distributed primitives from the shell. See `dprim --help`.

use clap::Parser;
use dprim_runtime::cli::{self, Cli};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args = Cli::parse();
    cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(dprim_runtime::exit::BACKEND);
        }
    };
    let code = runtime.block_on(cli::run(args));
    // Background tasks (keep-alives, a pending stdin read) must not delay exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    ExitCode::from(code)
}
