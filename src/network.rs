//! Each preview's own Docker network: naming, the warm pool that keeps network creation off a
//! launch's path, removal with the preview, the start-up reconcile, and the firewall around them
//! ([`firewall`]). Which subnet a network gets is planned in [`subnets`].
//!
//! A network belongs to a preview while a container labelled with its name exists
//! (`previewd.network`); any other network of the instance is free. The warm pool is only held
//! in memory: after a crash, the start-up reconcile takes free networks back into it (up to
//! `network.warm`) and removes the rest.

pub mod firewall;
pub mod subnets;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::NetworkConfig;
use crate::metrics::Metrics;
use crate::preview::InstanceName;
use crate::runtime::{CreateNetworkError, DockerError, NetworkSpec, Runtime};
pub use firewall::{Firewall, FirewallError};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

/// Subnets tried before a network creation gives up (another daemon may take each meanwhile).
const CREATE_ATTEMPTS: usize = 5;
/// Pause before the warm pool tries again after Docker refused a network.
const REFILL_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(
        "no free /{prefix} subnet is left in network.subnets ({range}): remove unused Docker networks or widen network.subnets"
    )]
    NoSubnet { range: ipnet::Ipv4Net, prefix: u8 },
}

/// A launch's claim on the warm pool's refill: the pool makes the network that replaces a
/// leased one when this is dropped (the launch is over), not while the launch's container
/// starts. On two cores, and on a Swarm's nodes, the new network's set-up (there: its
/// holders' tasks) would slow that start down.
pub struct Refill(Networks);

impl Drop for Refill {
    fn drop(&mut self) {
        self.0.inner.wanted.notify_one();
    }
}

/// The preview networks of one instance.
#[derive(Clone)]
pub struct Networks {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: std::sync::Arc<dyn Runtime>,
    instance: InstanceName,
    config: NetworkConfig,
    /// `pv-` and six hex digits of the instance name's hash: every bridge of the instance
    /// starts with it (Linux allows 15 characters in all).
    bridge_prefix: String,
    firewall: Firewall,
    /// Whether the networks are this host's, behind `firewall` (not a Swarm's overlays).
    fenced: bool,
    warm: Mutex<Vec<String>>,
    /// Woken when the pool is below `network.warm`.
    wanted: Notify,
    /// The pool's size, and the launches that found it empty.
    warm_gauge: Gauge,
    cold: Counter,
}

impl Networks {
    /// `fenced`: the networks are this host's bridges, behind previewd's firewall (on a Swarm
    /// they are overlays on the nodes, which this host's rules do not see).
    pub fn new(
        runtime: std::sync::Arc<dyn Runtime>,
        instance: InstanceName,
        config: NetworkConfig,
        fenced: bool,
        metrics: &Metrics,
    ) -> Self {
        let bridge_prefix = bridge_prefix(&instance);
        let firewall = Firewall::new(&bridge_prefix, config.egress);
        let inner = Inner {
            runtime,
            instance,
            config,
            bridge_prefix,
            firewall,
            fenced,
            warm: Mutex::default(),
            wanted: Notify::new(),
            warm_gauge: metrics.warm_networks.clone(),
            cold: metrics.cold_networks.clone(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Whether previews get networks of their own (`network.isolation`).
    pub fn enabled(&self) -> bool {
        self.inner.config.isolation
    }

    pub fn firewall(&self) -> &Firewall {
        &self.inner.firewall
    }

    /// A network for a new preview: a warm one, or one made now when the pool is empty. A warm
    /// network someone removed meanwhile (`docker network prune`) is passed over. The pool
    /// makes the network's replacement once the [`Refill`] is dropped.
    pub async fn lease(&self) -> Result<(String, Refill), NetworkError> {
        let refill = Refill(self.clone());
        while let Some(name) = self.take_warm() {
            if self.inner.runtime.network_exists(&name).await? {
                return Ok((name, refill));
            }
            tracing::warn!(network = name, "a warm network was removed behind previewd's back; taking another");
        }
        tracing::debug!("no warm network; creating one for this launch");
        self.inner.cold.inc();
        Ok((self.create().await?, refill))
    }

    /// Whether a preview's network still exists, for a replacement that would join it.
    pub async fn exists(&self, name: &str) -> Result<bool, NetworkError> {
        Ok(self.inner.runtime.network_exists(name).await?)
    }

    /// Removes a network no container uses any more; a failure is logged, and the next start's
    /// reconcile removes or reuses the network.
    pub async fn remove(&self, name: &str) {
        if let Err(err) = self.inner.runtime.remove_network(name).await {
            tracing::warn!(network = name, error = %err, "cannot remove a preview network; the next start will");
        }
    }

    /// `remove` for a network whose last container may still be going (a build stopped
    /// half-way: Docker removes its step container after the build's answer ends): tried a few
    /// times, a second apart.
    pub async fn remove_once_free(&self, name: &str) {
        const ATTEMPTS: usize = 10;
        for _ in 1..ATTEMPTS {
            if self.inner.runtime.remove_network(name).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        self.remove(name).await;
    }

    /// Start-up (after `app` installed the firewall, first of all): networks of this instance that
    /// no container in `in_use` names are taken into the warm pool (up to `network.warm`) or
    /// removed. With isolation off, every free network goes, and the instance's own firewall
    /// rule once none is left.
    pub async fn reconcile(&self, in_use: &HashSet<String>) -> Result<(), NetworkError> {
        let networks = self.inner.runtime.list_networks().await?;
        let mut keep = if self.enabled() { self.inner.config.warm } else { 0 };
        let mut left = 0;
        for network in networks {
            if in_use.contains(&network.name) {
                left += 1;
            } else if keep > 0 && network.bridge.as_deref().is_some_and(|b| b.starts_with(&self.inner.bridge_prefix)) {
                keep -= 1;
                left += 1;
                let this = self.clone();
                let name = network.name.clone();
                tokio::spawn(async move { this.prepare(&name).await });
                self.put_warm(network.name);
            } else if let Err(err) = self.inner.runtime.remove_network(&network.name).await {
                // Say, a container attached by hand: the next start tries again.
                tracing::warn!(network = network.name, error = %err, "cannot remove a network no preview uses");
                left += 1;
            }
        }
        if !self.enabled() && left == 0 && self.inner.fenced {
            self.inner.firewall.remove().await;
        }
        Ok(())
    }

    /// Keeps `network.warm` networks ready until `shutdown`.
    pub async fn keep_warm(self, shutdown: CancellationToken) {
        if !self.enabled() || self.inner.config.warm == 0 {
            return;
        }
        loop {
            while self.warm_count() < self.inner.config.warm {
                match self.create().await {
                    Ok(name) => {
                        self.prepare(&name).await;
                        self.put_warm(name);
                        self.repair_firewall().await;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot keep a network ready for launches; trying again");
                        tokio::select! {
                            () = tokio::time::sleep(REFILL_BACKOFF) => {}
                            () = shutdown.cancelled() => return,
                        }
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                () = self.inner.wanted.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Gets a network ready before it goes into the pool; a network that could not be is still
    /// usable, only slower to launch on.
    async fn prepare(&self, name: &str) {
        if let Err(err) = self.inner.runtime.prepare_network(name).await {
            tracing::warn!(network = name, error = %err, "cannot get a warm network ready on the nodes");
        }
    }

    /// Puts the firewall back if its jumps are gone (a firewall reload by another tool, an
    /// `iptables -F`), checked each time the pool makes a network.
    async fn repair_firewall(&self) {
        if !self.inner.fenced || self.inner.firewall.installed().await {
            return;
        }
        tracing::warn!("the preview networks' firewall rules were gone; installing them again");
        if let Err(err) = self.inner.firewall.install().await {
            tracing::error!(error = %err, "cannot install the preview networks' firewall again");
        }
    }

    /// How many subnets of `network.subnets` no network on the engine overlaps.
    pub async fn free_subnets(&self) -> Result<usize, NetworkError> {
        let mut used = self.inner.runtime.used_subnets().await?;
        used.extend(subnets::host_routes());
        Ok(subnets::free(self.inner.config.subnets, self.inner.config.subnet_prefix, &used, 0).count())
    }

    /// How many networks are ready now.
    pub fn warm_count(&self) -> usize {
        self.inner.warm.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn take_warm(&self) -> Option<String> {
        let mut warm = self.inner.warm.lock().unwrap_or_else(PoisonError::into_inner);
        let name = warm.pop();
        self.inner.warm_gauge.set(warm.len() as i64);
        name
    }

    fn put_warm(&self, name: String) {
        let mut warm = self.inner.warm.lock().unwrap_or_else(PoisonError::into_inner);
        warm.push(name);
        self.inner.warm_gauge.set(warm.len() as i64);
    }

    /// A new network on a free subnet of `network.subnets`.
    async fn create(&self) -> Result<String, NetworkError> {
        let config = &self.inner.config;
        for _ in 0..CREATE_ATTEMPTS {
            let mut used = self.inner.runtime.used_subnets().await?;
            used.extend(subnets::host_routes());
            let start = rand::random::<u32>() as usize;
            let Some(subnet) = subnets::free(config.subnets, config.subnet_prefix, &used, start).next() else {
                return Err(NetworkError::NoSubnet { range: config.subnets, prefix: config.subnet_prefix });
            };
            let bridge = format!("{}{:05x}", self.inner.bridge_prefix, rand::random::<u32>() & 0x000f_ffff);
            let name = self.inner.runtime.network_name(&self.inner.instance, &bridge);
            match self.inner.runtime.create_network(&NetworkSpec { name: &name, bridge: &bridge, subnet }).await {
                Ok(()) => return Ok(name),
                Err(CreateNetworkError::SubnetTaken(message)) => {
                    tracing::debug!(%subnet, message, "subnet taken meanwhile; trying another");
                }
                Err(CreateNetworkError::Docker(err)) => return Err(err.into()),
            }
        }
        Err(NetworkError::NoSubnet { range: config.subnets, prefix: config.subnet_prefix })
    }
}

/// What every bridge of `instance` is named with: `pv-` and six hex digits of the name's hash.
pub fn bridge_prefix(instance: &InstanceName) -> String {
    format!("pv-{}", instance_tag(instance))
}

fn instance_tag(instance: &InstanceName) -> String {
    hex::encode(Sha256::digest(instance.as_ref().as_bytes()))[..6].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_linux_interface_names() {
        let tag = instance_tag(&InstanceName::parse(&"x".repeat(32)).unwrap());
        // "pv-" + tag + five random hex digits
        assert_eq!(3 + tag.len() + 5, 14);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn instances_get_different_tags() {
        let a = instance_tag(&InstanceName::parse("default").unwrap());
        let b = instance_tag(&InstanceName::parse("staging").unwrap());
        assert_ne!(a, b);
    }
}
