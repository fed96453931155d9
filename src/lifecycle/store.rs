//! What the lifecycle keeps per preview across restarts: a map from preview name to a record,
//! as a JSON file in the state directory, written atomically after each change. Which previews
//! sleep (`asleep.json`), which are pinned awake (`pinned.json`), which were removed by age
//! (`expired.json`) and when each last served a request (`last-requests.json`) are such files.
//! An entry whose name is no longer a valid [`Slug`] makes the file unreadable; it is reported
//! and taken as empty rather than keeping previewd from starting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::LifecycleError;
use crate::preview::Slug;

/// A record per preview, persisted in one file.
pub struct SlugFile<V> {
    path: PathBuf,
    entries: Mutex<BTreeMap<Slug, V>>,
}

impl<V: Clone + Serialize + DeserializeOwned> SlugFile<V> {
    /// Reads `<state_dir>/<name>` (none: no entries).
    pub fn load(state_dir: &Path, name: &str) -> Self {
        let path = state_dir.join(name);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::error!(path = %path.display(), error = %err, "cannot read this state file; taking it as empty");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Self { path, entries: Mutex::new(entries) }
    }

    pub fn get(&self, slug: &Slug) -> Option<V> {
        self.entries().get(slug).cloned()
    }

    pub fn contains(&self, slug: &Slug) -> bool {
        self.entries().contains_key(slug)
    }

    pub fn all(&self) -> BTreeMap<Slug, V> {
        self.entries().clone()
    }

    /// Sets (or with `None` removes) a preview's record, and writes the file.
    pub fn set(&self, slug: &Slug, value: Option<V>) -> Result<(), LifecycleError> {
        let mut entries = self.entries();
        match value {
            Some(value) => entries.insert(slug.clone(), value),
            None => entries.remove(slug),
        };
        self.write(&entries)
    }

    /// Removes the records `keep` refuses; writes the file only if one went.
    pub fn retain(&self, mut keep: impl FnMut(&Slug, &V) -> bool) -> Result<(), LifecycleError> {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|slug, value| keep(slug, value));
        if entries.len() == before { Ok(()) } else { self.write(&entries) }
    }

    /// Replaces every record; writes the file only if that changed something.
    pub fn replace(&self, all: BTreeMap<Slug, V>) -> Result<(), LifecycleError>
    where
        V: PartialEq,
    {
        let mut entries = self.entries();
        if *entries == all {
            return Ok(());
        }
        *entries = all;
        self.write(&entries)
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<Slug, V>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, entries: &BTreeMap<Slug, V>) -> Result<(), LifecycleError> {
        let bytes = serde_json::to_vec_pretty(entries).map_err(|err| LifecycleError::State(err.to_string()))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|err| LifecycleError::State(err.to_string()))?;
        }
        crate::nginx::sites::write_atomic(&self.path, &bytes)
            .map_err(|err| LifecycleError::State(format!("cannot write {}: {err}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(name: &str) -> Slug {
        Slug::parse(name).unwrap()
    }

    #[test]
    fn records_survive_a_reload_and_removed_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file: SlugFile<i64> = SlugFile::load(dir.path(), "records.json");
        file.set(&slug("one"), Some(1)).unwrap();
        file.set(&slug("two"), Some(2)).unwrap();
        file.set(&slug("one"), None).unwrap();
        file.retain(|_, value| *value != 3).unwrap();
        let again: SlugFile<i64> = SlugFile::load(dir.path(), "records.json");
        assert_eq!(again.all(), BTreeMap::from([(slug("two"), 2)]));
    }

    #[test]
    fn a_file_with_a_name_that_is_not_a_slug_is_taken_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("records.json"), br#"{"../etc": 1}"#).unwrap();
        let file: SlugFile<i64> = SlugFile::load(dir.path(), "records.json");
        assert!(file.all().is_empty());
    }
}
