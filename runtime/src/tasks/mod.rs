//! Task launch, implemented once on top of the other primitives.
//!
//! - [`state`]: the pure task state machine (events in, new state + actions out).
//! - [`placement`]: the [`placement::Placer`] interface and its first-fit placer.
//! - [`process`]: one task as a child process: own process group, sandbox,
//!   output files, kill with a grace period.
//! - [`resources`]: parsing resources, attributes and constraints as written
//!   on the command line.
pub mod placement;
pub mod process;
pub mod resources;
pub mod state;
