//! What previewd remembers of GitHub's deliveries across restarts, in
//! `<state_dir>/github-deliveries.json`: the ids of recent deliveries (a redelivery after a
//! restart is still a duplicate) and, per pull request, the `updated_at` of the newest state
//! previewd applied (a captured delivery replayed after a restart is still older than what
//! previewd did). Both are bounded. One writer task writes the file atomically after changes,
//! coalescing those that come while it writes; a file that cannot be read is reported and
//! replaced rather than keeping previewd from starting.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::feedback::PullRequestKey;
use super::webhook::DeliveryLog;
use crate::nginx::sites::write_atomic;

pub const FILE_NAME: &str = "github-deliveries.json";
const VERSION: u32 = 1;
/// Pull requests whose applied state is remembered; past this, the one updated longest ago is
/// forgotten (it then gets no protection beyond GitHub's answer, see `previews`).
pub const MAX_PULL_REQUESTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not the JSON previewd writes: {0}")]
    Json(#[from] serde_json::Error),
    #[error("version {0}, and this previewd reads version {VERSION}")]
    Version(u32),
}

/// The file's content.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// Oldest first.
    pub deliveries: Vec<String>,
    pub pull_requests: Vec<Applied>,
    /// Fork commits approved with `/preview approve` (absent from files of earlier previewd).
    #[serde(default)]
    pub approvals: Vec<Approval>,
}

/// A fork's commit a maintainer approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// `owner/name`, lowercased.
    pub repo: String,
    pub number: u64,
    pub sha: String,
    /// The approver's login.
    pub by: String,
}

/// The newest state applied to one pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// `owner/name`, lowercased: GitHub's names are case-insensitive, and config.yml may change case.
    pub repo: String,
    pub number: u64,
    pub updated_at: String,
}

pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    // A struct of strings and numbers always serialises.
    serde_json::to_vec(snapshot).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    let snapshot: Snapshot = serde_json::from_slice(bytes)?;
    if snapshot.version != VERSION {
        return Err(DecodeError::Version(snapshot.version));
    }
    Ok(snapshot)
}

type Key = (String, u64);

fn key(pr: &PullRequestKey) -> Key {
    (pr.repo.to_ascii_lowercase(), pr.number)
}

pub struct Memory {
    path: PathBuf,
    deliveries: DeliveryLog,
    applied: Mutex<HashMap<Key, String>>,
    /// The approved commit (and approver) of each fork's pull request.
    approvals: Mutex<HashMap<Key, (String, String)>>,
    /// Changed since the last write.
    dirty: AtomicBool,
    changed: Notify,
}

impl Memory {
    /// What the file in `state_dir` holds; nothing when there is none yet, or (logged) when it
    /// cannot be read.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(FILE_NAME);
        let snapshot = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).unwrap_or_else(|err| {
                tracing::warn!(path = %path.display(), error = %err, "cannot use the delivery record; starting with none (redeliveries and replays from before this start are not recognised as such)");
                Snapshot::default()
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Snapshot::default(),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot read the delivery record; starting with none (redeliveries and replays from before this start are not recognised as such)");
                Snapshot::default()
            }
        };
        if let Err(err) = std::fs::create_dir_all(state_dir) {
            tracing::warn!(path = %state_dir.display(), error = %err, "cannot create state_dir; the delivery record will not be kept");
        }
        Self::from_snapshot(path, snapshot)
    }

    fn from_snapshot(path: PathBuf, snapshot: Snapshot) -> Self {
        let memory = Self {
            path,
            deliveries: DeliveryLog::from_ids(snapshot.deliveries),
            applied: Mutex::default(),
            approvals: Mutex::new(
                snapshot
                    .approvals
                    .into_iter()
                    .map(|a| ((a.repo.to_ascii_lowercase(), a.number), (a.sha, a.by)))
                    .collect(),
            ),
            dirty: AtomicBool::new(false),
            changed: Notify::new(),
        };
        {
            let mut applied = memory.applied.lock().unwrap_or_else(PoisonError::into_inner);
            for entry in snapshot.pull_requests {
                remember(&mut applied, (entry.repo.to_ascii_lowercase(), entry.number), entry.updated_at);
            }
        }
        memory
    }

    /// True the first time a delivery id is offered (GitHub reuses the id when it redelivers).
    pub fn first_delivery(&self, delivery: &str) -> bool {
        let first = self.deliveries.first_time(delivery);
        if first {
            self.mark_changed();
        }
        first
    }

    /// The `updated_at` of the newest state applied to a pull request, if remembered.
    pub fn applied(&self, pr: &PullRequestKey) -> Option<String> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner).get(&key(pr)).cloned()
    }

    /// Remembers that a state of this age was applied; an older one never replaces a newer one.
    pub fn set_applied(&self, pr: &PullRequestKey, updated_at: &str) {
        let changed =
            remember(&mut self.applied.lock().unwrap_or_else(PoisonError::into_inner), key(pr), updated_at.to_owned());
        if changed {
            self.mark_changed();
        }
    }

    /// The commit of a fork's pull request a maintainer approved, if any.
    pub fn approved(&self, pr: &PullRequestKey) -> Option<String> {
        self.approvals.lock().unwrap_or_else(PoisonError::into_inner).get(&key(pr)).map(|(sha, _)| sha.clone())
    }

    /// Approves a commit of a fork's pull request (an earlier approval of it is replaced).
    pub fn approve(&self, pr: &PullRequestKey, sha: &str, by: &str) {
        let mut approvals = self.approvals.lock().unwrap_or_else(PoisonError::into_inner);
        if approvals.len() >= MAX_PULL_REQUESTS
            && let Some(any) = approvals.keys().next().cloned()
        {
            approvals.remove(&any);
        }
        approvals.insert(key(pr), (sha.to_owned(), by.to_owned()));
        drop(approvals);
        self.mark_changed();
    }

    /// Forgets a pull request's approval (its preview went: closed, or another commit pushed).
    pub fn forget_approval(&self, pr: &PullRequestKey) {
        if self.approvals.lock().unwrap_or_else(PoisonError::into_inner).remove(&key(pr)).is_some() {
            self.mark_changed();
        }
    }

    fn mark_changed(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    fn snapshot(&self) -> Snapshot {
        let applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        let mut pull_requests: Vec<Applied> = applied
            .iter()
            .map(|((repo, number), updated_at)| Applied {
                repo: repo.clone(),
                number: *number,
                updated_at: updated_at.clone(),
            })
            .collect();
        pull_requests.sort_by(|a, b| (&a.repo, a.number).cmp(&(&b.repo, b.number)));
        let approvals = self.approvals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut approvals: Vec<Approval> = approvals
            .iter()
            .map(|((repo, number), (sha, by))| Approval {
                repo: repo.clone(),
                number: *number,
                sha: sha.clone(),
                by: by.clone(),
            })
            .collect();
        approvals.sort_by(|a, b| (&a.repo, a.number).cmp(&(&b.repo, b.number)));
        Snapshot { version: VERSION, deliveries: self.deliveries.ids(), pull_requests, approvals }
    }

    /// Writes the file after each change until `stop`, then once more if anything changed
    /// since: cancel `stop` only once nothing will change any more.
    pub async fn keep_written(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                () = self.changed.notified() => false,
                () = stop.cancelled() => true,
            };
            self.write().await;
            if stopping {
                return;
            }
        }
    }

    async fn write(self: &Arc<Self>) {
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return;
        }
        let memory = Arc::clone(self);
        // fsync takes milliseconds to seconds on a busy disk: not on a runtime thread.
        let written =
            tokio::task::spawn_blocking(move || write_atomic(&memory.path, &encode(&memory.snapshot()))).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(err) => err.to_string(),
        };
        tracing::warn!(path = %self.path.display(), %error, "cannot write the delivery record; trying again at the next change");
        self.dirty.store(true, Ordering::SeqCst);
    }
}

/// Keeps the newer of two ages, within the bound; true when the map changed.
fn remember(applied: &mut HashMap<Key, String>, key: Key, updated_at: String) -> bool {
    if let Some(known) = applied.get_mut(&key) {
        if *known >= updated_at {
            return false;
        }
        *known = updated_at;
        return true;
    }
    if applied.len() >= MAX_PULL_REQUESTS
        && let Some(oldest) = applied.iter().min_by(|a, b| a.1.cmp(b.1)).map(|(key, _)| key.clone())
    {
        applied.remove(&oldest);
    }
    applied.insert(key, updated_at);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(repo: &str, number: u64) -> PullRequestKey {
        PullRequestKey { repo: repo.to_owned(), number }
    }

    #[test]
    fn a_snapshot_survives_encoding_and_names_its_fields() {
        let memory = Memory::from_snapshot(PathBuf::from("unused"), Snapshot::default());
        memory.first_delivery("d-1");
        memory.first_delivery("d-2");
        memory.set_applied(&pr("Codertocat/Hello-World", 2), "2019-05-15T15:21:18Z");
        memory.approve(&pr("Codertocat/Hello-World", 3), "abc", "alice");
        let bytes = encode(&memory.snapshot());
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"deliveries":["d-1","d-2"],"pull_requests":[{"repo":"codertocat/hello-world","number":2,"updated_at":"2019-05-15T15:21:18Z"}],"approvals":[{"repo":"codertocat/hello-world","number":3,"sha":"abc","by":"alice"}]}"#
        );
        let back = Memory::from_snapshot(PathBuf::from("unused"), decode(&bytes).unwrap());
        assert!(!back.first_delivery("d-2"), "a delivery seen before the restart is a duplicate");
        assert_eq!(back.applied(&pr("codertocat/HELLO-world", 2)).as_deref(), Some("2019-05-15T15:21:18Z"));
        assert_eq!(back.approved(&pr("codertocat/hello-world", 3)).as_deref(), Some("abc"));
    }

    #[test]
    fn a_forgotten_approval_is_gone() {
        let memory = Memory::from_snapshot(PathBuf::from("unused"), Snapshot::default());
        memory.approve(&pr("o/r", 1), "abc", "alice");
        memory.forget_approval(&pr("O/R", 1));
        assert_eq!(memory.approved(&pr("o/r", 1)), None);
    }

    #[test]
    fn a_file_from_before_approvals_reads_as_none() {
        let old = br#"{"version":1,"deliveries":["d-1"],"pull_requests":[]}"#;
        let memory = Memory::from_snapshot(PathBuf::from("unused"), decode(old).unwrap());
        assert_eq!(memory.approved(&pr("o/r", 1)), None);
    }

    #[test]
    fn other_json_and_other_versions_are_refused() {
        assert!(matches!(decode(b"{\"version\":1,"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"[]"), Err(DecodeError::Json(_))));
        let future = br#"{"version":2,"deliveries":[],"pull_requests":[]}"#;
        assert!(matches!(decode(future), Err(DecodeError::Version(2))));
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let memory = Memory::from_snapshot(PathBuf::from("unused"), Snapshot::default());
        let key = pr("o/r", 1);
        memory.set_applied(&key, "2030-01-01T10:00:05Z");
        memory.set_applied(&key, "2030-01-01T10:00:01Z");
        assert_eq!(memory.applied(&key).as_deref(), Some("2030-01-01T10:00:05Z"));
    }

    #[test]
    fn the_pull_requests_updated_longest_ago_are_forgotten_first() {
        let mut applied = HashMap::new();
        remember(&mut applied, ("o/r".into(), 0), "2000-01-01T00:00:00Z".into());
        for number in 1..MAX_PULL_REQUESTS as u64 {
            remember(&mut applied, ("o/r".into(), number), "2030-01-01T00:00:00Z".into());
        }
        assert!(remember(&mut applied, ("o/r".into(), 99_999), "2030-01-01T00:00:00Z".into()));
        assert_eq!(applied.len(), MAX_PULL_REQUESTS);
        assert!(!applied.contains_key(&("o/r".into(), 0)));
    }

    #[tokio::test]
    async fn the_writer_writes_what_changed_and_a_corrupt_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(Memory::load(dir.path()));
        assert!(memory.first_delivery("d-1"));
        let stop = CancellationToken::new();
        stop.cancel();
        Arc::clone(&memory).keep_written(stop).await;
        let again = Memory::load(dir.path());
        assert!(!again.first_delivery("d-1"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");

        std::fs::write(dir.path().join(FILE_NAME), "{ not json").unwrap();
        assert!(Memory::load(dir.path()).first_delivery("d-1"));
    }
}
