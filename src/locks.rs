//! One async lock per key: operations on the same key run one at a time, different keys run in
//! parallel. Used for "one owner per preview" and for single-flight password checks.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub struct KeyedLocks<K>(Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>);

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    /// Above this many keys, locks nobody holds or waits for are dropped.
    const PRUNE_ABOVE: usize = 1024;

    pub async fn lock(&self, key: &K) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if locks.len() > Self::PRUNE_ABOVE {
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_key_is_serialized_and_others_are_not() {
        let locks = KeyedLocks::default();
        let guard = locks.lock(&"a").await;
        let other = tokio::time::timeout(Duration::from_millis(50), locks.lock(&"b")).await;
        assert!(other.is_ok(), "a different key must not wait");
        let same = tokio::time::timeout(Duration::from_millis(50), locks.lock(&"a")).await;
        assert!(same.is_err(), "the same key must wait");
        drop(guard);
        assert!(tokio::time::timeout(Duration::from_millis(50), locks.lock(&"a")).await.is_ok());
    }

    #[tokio::test]
    async fn unused_locks_are_pruned() {
        let locks = KeyedLocks::default();
        for key in 0..=KeyedLocks::<u32>::PRUNE_ABOVE as u32 + 1 {
            drop(locks.lock(&key).await);
        }
        assert!(locks.0.lock().unwrap().len() <= 2);
    }
}
