//! Task launch, implemented once on top of the other primitives, so it
//! works on every backend.
//!
//! - [`state`]: the pure task state machine (events in, new state + actions out).
//! - [`placement`]: the [`placement::Placer`] interface and its first-fit placer.
//! - [`resources`]: parsing resources, attributes and constraints as written
//!   on the command line.
//! - [`cgroup`]: memory and CPU limits through Linux control groups (v2, else v1).
//! - [`process`]: one task as a child process: own process group, sandbox,
//!   output files, kill with a grace period.
//! - `store` (private): the keys and records task launch keeps in Kv.
//! - [`supervisor`]: the elected supervisor that places tasks and tracks agents.
//! - [`agent`]: the agent that runs assigned tasks and reports on them.
//! - [`client`]: [`client::TasksClient`], the [`dprim::Tasks`] implementation.
//! - [`cluster`]: supervisors and agents per conformance case, in this
//!   process or as `dprim` child processes, for the suite's `tasks::` cases.
//! - [`logs`]: a launch's stdout/stderr read through the backend: the
//!   agent's log server and the client's [`logs::TaskLogs`].
pub mod agent;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod logs;
pub mod placement;
pub mod process;
pub mod resources;
pub mod state;
mod store;
pub mod supervisor;
