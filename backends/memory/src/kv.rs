//! Kv over the namespace state.

use crate::state::{Namespace, WatchOpen};
use async_trait::async_trait;
use dprim::{
    Depth, Entry, Key, Kv, Listing, Precondition, PutOptions, Result, Txn, TxnResult, Value,
    Version, WatchEvent, WatchStart, WatchStream, WatchTarget,
};
use futures::StreamExt;
use std::sync::atomic::Ordering;
use tokio_stream::wrappers::ReceiverStream;

pub(crate) struct MemoryKv {
    ns: Namespace,
}

impl MemoryKv {
    pub(crate) fn new(ns: Namespace) -> MemoryKv {
        MemoryKv { ns }
    }
}

#[async_trait]
impl Kv for MemoryKv {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        Ok(self.ns.with(|s| s.get(key)))
    }

    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        self.ns.with(|s| s.put(key, value, options))
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        self.ns.with(|s| s.delete(key, precondition))
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        Ok(self.ns.with(|s| s.list(dir, depth)))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.ns.with(|s| s.txn(txn))
    }

    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream> {
        let opened = self.ns.with(|s| s.watch(target, start));
        Ok(match opened {
            WatchOpen::Compacted { reason } => {
                WatchStream::new(futures::stream::iter([Ok(WatchEvent::Resync { reason })]).boxed())
            }
            WatchOpen::Live {
                replay,
                rx,
                overflowed,
            } => {
                let tail = futures::stream::once(async move {
                    overflowed.load(Ordering::SeqCst).then(|| WatchEvent::Resync {
                        reason: "the watcher fell behind and its buffer overflowed; re-list and watch again"
                            .to_string(),
                    })
                })
                .filter_map(futures::future::ready);
                let events = futures::stream::iter(replay)
                    .chain(ReceiverStream::new(rx))
                    .chain(tail)
                    .map(Ok);
                WatchStream::new(events.boxed())
            }
        })
    }
}
