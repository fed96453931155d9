//! A small map whose entries expire: remembered password checks, GitHub token owners and
//! permissions. Bounded: when full, expired entries go first, then everything.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct ExpiringMap<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
    ttl: Duration,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> ExpiringMap<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { entries: Mutex::new(HashMap::new()), ttl, capacity }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(key).filter(|(_, until)| Instant::now() < *until).map(|(value, _)| value.clone())
    }

    pub fn insert(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (value, Instant::now() + self.ttl));
    }

    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_map_stays_bounded() {
        let map = ExpiringMap::new(Duration::from_millis(30), 3);
        map.insert(1, "a");
        assert_eq!(map.get(&1), Some("a"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(map.get(&1), None);
        for key in 0..10 {
            map.insert(key, "x");
        }
        assert!(map.size() <= 3);
        assert_eq!(map.get(&9), Some("x"), "the newest entry is kept");
    }
}
