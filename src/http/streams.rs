//! Followed log streams are long-lived answers: each holds a connection and a Docker log stream.
//! [`LogStreams`] caps how many are open per caller and in all (`limits.log_streams_per_user`,
//! `limits.log_streams`); a [`StreamSlot`] gives its place back when the stream ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::auth::Principal;
use crate::config::Limits;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamsFull {
    #[error("you follow {limit} logs already (limits.log_streams_per_user); close one, or read without follow=true")]
    PerUser { limit: usize },
    #[error(
        "{limit} logs are followed on this host already (limits.log_streams); try again later, or read without follow=true"
    )]
    Total { limit: usize },
}

pub struct LogStreams {
    per_user: usize,
    total: usize,
    /// A followed log ends after this long; the client can follow again.
    pub max_follow: Duration,
    open: Mutex<HashMap<String, usize>>,
}

/// One open stream's place.
pub struct StreamSlot {
    streams: Arc<LogStreams>,
    caller: String,
}

impl LogStreams {
    pub fn new(limits: &Limits) -> Self {
        Self {
            per_user: limits.log_streams_per_user,
            total: limits.log_streams,
            max_follow: Duration::from_secs(limits.log_stream_seconds),
            open: Mutex::default(),
        }
    }

    pub fn take(self: &Arc<Self>, principal: &Principal) -> Result<StreamSlot, StreamsFull> {
        let caller = match principal {
            Principal::User(name) => format!("user:{name}"),
            Principal::GitHub(login) => format!("github:{login}"),
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.values().sum::<usize>() >= self.total {
            return Err(StreamsFull::Total { limit: self.total });
        }
        let mine = open.entry(caller.clone()).or_default();
        if *mine >= self.per_user {
            return Err(StreamsFull::PerUser { limit: self.per_user });
        }
        *mine += 1;
        Ok(StreamSlot { streams: Arc::clone(self), caller })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(per_user: usize, total: usize) -> Arc<LogStreams> {
        Arc::new(LogStreams::new(&Limits { log_streams_per_user: per_user, log_streams: total, ..Limits::default() }))
    }

    #[test]
    fn a_caller_gets_no_more_than_its_share_and_a_closed_stream_frees_its_place() {
        let streams = streams(2, 10);
        let ann = Principal::User("ann".into());
        let first = streams.take(&ann).unwrap();
        let _second = streams.take(&ann).unwrap();
        assert_eq!(streams.take(&ann).err(), Some(StreamsFull::PerUser { limit: 2 }));
        assert!(streams.take(&Principal::GitHub("ann".into())).is_ok(), "another caller of the same name");
        drop(first);
        assert!(streams.take(&ann).is_ok());
    }

    #[test]
    fn the_total_counts_every_caller() {
        let streams = streams(8, 2);
        let _a = streams.take(&Principal::User("a".into())).unwrap();
        let _b = streams.take(&Principal::User("b".into())).unwrap();
        assert_eq!(streams.take(&Principal::User("c".into())).err(), Some(StreamsFull::Total { limit: 2 }));
        assert!(streams.open.lock().unwrap().values().sum::<usize>() == 2);
    }
}
