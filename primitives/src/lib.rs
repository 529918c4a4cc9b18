//! dprim: portable distributed primitives.
//!
//! An application is written once against these traits; the organization
//! that runs it picks etcd, ZooKeeper, NATS or the embedded in-memory backend
//! in a config file, and the app behaves the same. The contract of every
//! method is stated in its `# Behavior` section; the conformance suite
//! (`dprim-conformance`) checks each of those sentences on every backend.
//!
//! # Layout
//! - [`error`]: the one [`Error`] type and its portable [`ErrorKind`]s.
//! - [`key`]: the portable key grammar ([`Key`]) and the value size limit ([`Value`]).
//! - [`kv`]: versioned keys, compare-and-swap, transactions, watches ([`Kv`]).
//! - [`session`]: leases with a client-side safe-until deadline ([`Session`]).
//! - [`lock`]: locks with fencing tokens ([`Locks`]).
//! - [`election`]: leader election with terms ([`Elections`]).
//! - [`pubsub`]: at-most-once topics with explicit lag ([`PubSub`]).
//! - [`queue`]: at-least-once work queues with dead-lettering ([`Queues`]).
//! - [`tasks`]: launching processes on agents ([`Tasks`]; implemented in `dprim-runtime`).
//! - [`capabilities`]: what each backend declares it can do.
//! - [`config`]: the TOML config file; [`registry`]: `kind` -> constructor.
//! - [`retry`]: the one retry layer for `temporary` errors.
//! - [`backend`]: [`Backend`], the handle bundling all primitives of one backend instance.
#![deny(missing_docs)]

pub mod backend;
pub mod capabilities;
pub mod config;
pub mod election;
pub mod error;
pub mod key;
pub mod kv;
pub mod lock;
pub mod pubsub;
pub mod queue;
pub mod registry;
pub mod retry;
pub mod session;
pub mod tasks;

pub use backend::{Backend, BackendParts, Faults};
pub use capabilities::Capabilities;
pub use config::{BackendConfig, Config};
pub use election::{Elections, Leader, Leadership, Term};
pub use error::{Error, ErrorKind, Result};
pub use key::{Key, Value, MAX_KEY_BYTES, MAX_KEY_SEGMENTS, MAX_VALUE_BYTES};
pub use kv::{
    Depth, Entry, Kv, KvExt, Listing, Precondition, PutOptions, Txn, TxnOp, TxnResult, Version,
    WatchEvent, WatchStart, WatchStream, WatchTarget,
};
pub use lock::{FencingToken, LockGuard, Locks};
pub use pubsub::{Message, PubSub, Subscription, SubscriptionItem};
pub use queue::{
    Delivery, MessageId, PullOptions, Queue, QueueDepth, QueueOptions, Queues, Receipt,
};
pub use registry::Registry;
pub use session::{Session, SessionId, SessionState, Sessions};
pub use tasks::{TaskId, TaskSpec, TaskState, TaskStatus, Tasks};
