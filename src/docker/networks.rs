//! Preview networks on the Docker API: create one on a given subnet and bridge name, list this
//! instance's, tell which subnets the engine uses, remove one. Which network a preview gets, and
//! when, is `crate::network`'s business.

use std::collections::HashMap;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use ipnet::Ipv4Net;

use async_trait::async_trait;

use super::{DockerRuntime, LABEL_INSTANCE, LABEL_MANAGED, is_not_found};
use crate::runtime::{CreateNetworkError, DockerError, ManagedNetwork, NetworkSpec, Networking};

/// Docker's option naming the Linux bridge of a network: previewd names them so that its
/// firewall rules can match all of an instance's bridges with one interface wildcard.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

#[async_trait]
impl Networking for DockerRuntime {
    async fn create_network(&self, spec: &NetworkSpec<'_>) -> Result<(), CreateNetworkError> {
        let gateway = spec.subnet.hosts().next().map(|ip| ip.to_string());
        let request = NetworkCreateRequest {
            name: spec.name.to_owned(),
            driver: Some("bridge".to_owned()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig { subnet: Some(spec.subnet.to_string()), gateway, ..Default::default() }]),
                ..Default::default()
            }),
            options: Some(HashMap::from([(BRIDGE_NAME_OPTION.to_owned(), spec.bridge.to_owned())])),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_INSTANCE.to_owned(), self.instance.to_string()),
            ])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) if message.contains("overlap") => {
                Err(CreateNetworkError::SubnetTaken(message))
            }
            Err(err) => Err(DockerError::from_bollard("create a network", err).into()),
        }
    }

    /// Whether a network of that name exists (someone may have pruned it).
    async fn network_exists(&self, name: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_network(name, None).await {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("inspect a network", err)),
        }
    }

    /// Removes a network; one that is already gone is fine.
    async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.remove_network(name).await {
            Err(err) if !is_not_found(&err) => Err(DockerError::from_bollard("remove a network", err)),
            _ => Ok(()),
        }
    }

    /// This instance's networks.
    async fn list_networks(&self) -> Result<Vec<ManagedNetwork>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), self.instance_labels())]);
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
            .await
            .map_err(|err| DockerError::from_bollard("list networks", err))?;
        Ok(networks
            .into_iter()
            .filter_map(|network| {
                let bridge = network.options.as_ref().and_then(|options| options.get(BRIDGE_NAME_OPTION).cloned());
                Some(ManagedNetwork { name: network.name?, bridge })
            })
            .collect())
    }

    /// The IPv4 subnets of every network on the engine, previewd's or not.
    async fn used_subnets(&self) -> Result<Vec<Ipv4Net>, DockerError> {
        let networks = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|err| DockerError::from_bollard("list networks", err))?;
        Ok(networks
            .into_iter()
            .flat_map(|network| network.ipam.and_then(|ipam| ipam.config).unwrap_or_default())
            .filter_map(|config| config.subnet?.parse().ok())
            .collect())
    }
}
