//! One async lock per key (a VM name, an image name, a blob digest), made on
//! first use and forgotten once nobody holds or waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub type KeyGuard = OwnedMutexGuard<()>;

#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for `key`'s lock.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        self.handle(key).lock_owned().await
    }

    /// `key`'s lock if nobody holds it now.
    pub fn try_lock(&self, key: &str) -> Option<KeyGuard> {
        self.handle(key).try_lock_owned().ok()
    }

    /// The lock itself, for callers that wait on it in their own way
    /// (with a time limit, say).
    pub fn handle(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    /// How many keys are remembered (held or waited for).
    pub fn len(&self) -> usize {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_keys_are_independent() {
        let locks = KeyedLocks::default();
        let a = locks.lock("a").await;
        assert!(locks.try_lock("a").is_none());
        let b = locks.try_lock("b").expect("another key is free");
        assert_eq!(locks.len(), 2);
        drop(a);
        assert!(locks.try_lock("a").is_some());
        drop(b);
        assert!(locks.is_empty(), "released keys are forgotten");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let locks = Arc::new(KeyedLocks::default());
        let held = locks.lock("vm").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { drop(locks.lock("vm").await) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        waiter.await.unwrap();
    }
}
