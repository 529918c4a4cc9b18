//! Task launch, implemented once on top of the other primitives.
//!
//! - [`state`]: the pure task state machine (events in, new state + actions out).
pub mod state;
