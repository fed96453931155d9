//! Holders: one idle task per node on each warm overlay network (`runtime.holder`). A node sets
//! an overlay up when the first task on it arrives there and tears it down after the last one
//! leaves; that set-up (about half a second) would otherwise be on a launch's path. A holder is
//! a global service labelled with the network it holds (and no `previewd.managed`: it is no
//! preview's); it goes once the preview that took the network runs, or with the network.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::SwarmRuntime;
use super::spec;
use crate::docker::is_not_found;
use crate::docker::labels::*;
use crate::runtime::{DockerError, Networking};

/// How long getting a network ready waits for its holders (it is off any launch's path).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a network's removal waits for its holder's tasks to be gone.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(200);

impl SwarmRuntime {
    /// Starts the holder of `network` (unless it has one) and waits until a holder runs on
    /// every node it can; a node that refuses it (the image is not there) is logged, and a
    /// launch there waits for Swarm to set the network up.
    pub(super) async fn hold(&self, network: &str) -> Result<(), DockerError> {
        let Some(holder) = &self.holder else { return Ok(()) };
        let id = match self.holder_of(network).await? {
            Some(id) => id,
            None => {
                let labels = spec::holder_labels(&self.instance, network);
                let service =
                    spec::holder_service(spec::holder_name(network), labels, holder, network, &self.constraints);
                self.create_spec(service, "create the network's holder").await?
            }
        };
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let tasks = self.tasks_of(std::slice::from_ref(&id)).await?.remove(&id).unwrap_or_default();
            match spec::holders_settled(&tasks) {
                Some(refused) => {
                    for task in refused {
                        tracing::warn!(
                            network,
                            node = task.node.as_deref().unwrap_or("?"),
                            reason = task.message,
                            "runtime.holder cannot run on a node: a launch there waits for Swarm to set its network up"
                        );
                    }
                    return Ok(());
                }
                None if Instant::now() >= deadline => {
                    tracing::warn!(network, "the network's holders did not all start within a minute");
                    return Ok(());
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Removes the holder of `network`; whether it had one. Its tasks end a moment later.
    pub(super) async fn release(&self, network: &str) -> Result<bool, DockerError> {
        let Some(id) = self.holder_of(network).await? else { return Ok(false) };
        match self.docker.delete_service(&id).await {
            Ok(()) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("remove the network's holder", err)),
        }
    }

    /// Removes a network whose holder was just removed: Swarm refuses while the holder's tasks
    /// (killed, not asked to stop) are still attached.
    pub(super) async fn remove_released(&self, network: &str) -> Result<(), DockerError> {
        let deadline = Instant::now() + GONE_TIMEOUT;
        loop {
            match self.engine.remove_network(network).await {
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!(network, error = %err, "the network's holder is still attached; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                done => return done,
            }
        }
    }

    /// `release` off the caller's path: the preview that took the network now keeps it set up
    /// on its node. Also without `runtime.holder` now: it may have been set when the network
    /// was made.
    pub(super) fn release_later(&self, network: &str) {
        let (runtime, network) = (self.clone(), network.to_owned());
        tokio::spawn(async move {
            if let Err(err) = runtime.release(&network).await {
                tracing::warn!(network, error = %err, "cannot remove the holder of a network a preview took");
            }
        });
    }

    /// Start-up: holders of networks that are gone or that a preview took (previewd stopped
    /// before it removed them) go.
    pub(super) async fn reconcile_holders(&self) -> Result<(), DockerError> {
        let holders = self.holders().await?;
        if holders.is_empty() {
            return Ok(());
        }
        let networks: HashSet<String> = self.list_networks().await?.into_iter().map(|n| n.name).collect();
        let taken: HashSet<String> = self
            .services(None)
            .await?
            .into_iter()
            .filter_map(|service| service.spec?.labels?.remove(LABEL_NETWORK))
            .collect();
        for network in holders.into_keys() {
            if !networks.contains(&network) || taken.contains(&network) {
                tracing::info!(network, "removing the holder of a network that is gone or taken");
                self.release(&network).await?;
            }
        }
        Ok(())
    }

    /// This instance's holders, by the network each holds.
    async fn holders(&self) -> Result<HashMap<String, String>, DockerError> {
        let labels = vec![format!("{LABEL_INSTANCE}={}", self.instance), LABEL_HOLDS.to_owned()];
        Ok(self
            .services_labelled(labels, "list the networks' holders")
            .await?
            .into_iter()
            .filter_map(|service| Some((service.spec?.labels?.remove(LABEL_HOLDS)?, service.id?)))
            .collect())
    }

    async fn holder_of(&self, network: &str) -> Result<Option<String>, DockerError> {
        Ok(self.holders().await?.remove(network))
    }
}
