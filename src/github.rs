//! GitHub pull-request previews: webhook deliveries in ([`webhook`], [`event`]), the desired
//! state of each pull request, as GitHub's API confirms it, applied through the lifecycle
//! ([`previews`]), what is remembered of deliveries across restarts ([`memory`]), a periodic sync with
//! GitHub's open pull requests for deliveries that were missed ([`sync`]), feedback on the PR
//! ([`feedback`] over [`client`]), and GitHub tokens as API credentials ([`token_auth`]).

pub mod client;
pub mod command;
pub mod commands;
pub mod event;
pub mod feedback;
pub mod memory;
pub mod previews;
pub mod sync;
pub mod tarball;
pub mod token_auth;
pub mod webhook;
