//! previewd's Docker labels, written and read back here only: they are the record of what runs
//! (which instance, preview, role, pull request and owner), so every start can reconcile from
//! them alone.

use std::collections::HashMap;

use crate::preview::{Role, ServiceName};
use crate::request::{Owner, PullRequestOrigin};

pub const LABEL_MANAGED: &str = "previewd.managed";
pub const LABEL_INSTANCE: &str = "previewd.instance";
pub const LABEL_SLUG: &str = "previewd.slug";
pub const LABEL_IMAGE: &str = "previewd.image";
/// The container port that is routed, so the host port can be found again after a restart.
pub const LABEL_PORT: &str = "previewd.port";
/// The pull request a preview runs, when it came from a webhook.
pub const LABEL_REPO: &str = "previewd.repo";
pub const LABEL_PR: &str = "previewd.pr";
pub const LABEL_SHA: &str = "previewd.sha";
/// Who launched a preview by hand (`Owner`'s label form).
pub const LABEL_OWNER: &str = "previewd.owner";
/// The preview's own network (see `crate::network`); absent on Docker's default bridge.
pub const LABEL_NETWORK: &str = "previewd.network";
/// Creation time in nanoseconds: Docker's own `Created` has one-second resolution, too coarse
/// to tell which of two containers of a quick replace is the newer.
pub const LABEL_CREATED: &str = "previewd.created";
/// `app`, `service`, `job` or `seed-copy`; absent on containers of previewd before services
/// existed, which were all apps.
pub const LABEL_ROLE: &str = "previewd.role";
/// The service or job a container (or a data volume) is of.
pub const LABEL_PART: &str = "previewd.part";
/// The digest of a service's definition (`ServiceSpec::digest`) the container was made from.
pub const LABEL_DIGEST: &str = "previewd.digest";

/// On a Swarm service that keeps a warm network set up on the nodes (`crate::swarm`): the
/// network's name. Such a service has no `previewd.managed`: it is no preview's.
pub const LABEL_HOLDS: &str = "previewd.holds";

/// On images previewd built (with the instance, the preview's slug and the commit): never on a
/// container, so a container run from such an image by hand is not taken for a preview.
pub const LABEL_BUILT: &str = "previewd.built";
/// On a built image: the id of the image its build produced before previewd labelled it (the
/// layer cache of the preview's next build, removed with the labelled image).
pub const LABEL_CACHE: &str = "previewd.cache";
/// On a built image: the bytes its build added to its base image (see `/healthz`'s builds).
pub const LABEL_ADDED_BYTES: &str = "previewd.added-bytes";

/// Every label previewd reads off a container: a built image may carry none of them but its own
/// (containers inherit an image's labels where previewd sets none).
pub const CONTAINER_LABELS: [&str; 15] = [
    LABEL_MANAGED,
    LABEL_INSTANCE,
    LABEL_SLUG,
    LABEL_IMAGE,
    LABEL_PORT,
    LABEL_REPO,
    LABEL_PR,
    LABEL_SHA,
    LABEL_OWNER,
    LABEL_NETWORK,
    LABEL_CREATED,
    LABEL_ROLE,
    LABEL_PART,
    LABEL_DIGEST,
    LABEL_BUILT,
];

/// Adds the labels of who a preview is for: its pull request, or who launched it by hand.
pub fn put_origin(labels: &mut HashMap<String, String>, origin: Option<&PullRequestOrigin>, owner: Option<&Owner>) {
    if let Some(origin) = origin {
        labels.insert(LABEL_REPO.to_owned(), origin.repo.clone());
        labels.insert(LABEL_PR.to_owned(), origin.number.to_string());
        labels.insert(LABEL_SHA.to_owned(), origin.sha.clone());
    }
    if let Some(owner) = owner {
        labels.insert(LABEL_OWNER.to_owned(), owner.to_string());
    }
}

/// The pull request and the owner the labels say (`put_origin`), each `None` when absent or
/// tampered with.
pub fn origin(labels: &HashMap<String, String>) -> (Option<PullRequestOrigin>, Option<Owner>) {
    let number = labels.get(LABEL_PR).and_then(|number| number.parse().ok());
    let origin = match (labels.get(LABEL_REPO), number, labels.get(LABEL_SHA)) {
        (Some(repo), Some(number), Some(sha)) => {
            Some(PullRequestOrigin { repo: repo.clone(), number, sha: sha.clone() })
        }
        _ => None,
    };
    (origin, labels.get(LABEL_OWNER).and_then(|text| Owner::parse_label(text)))
}

/// The labels every object of an instance carries.
pub fn instance_labels(instance: &str) -> HashMap<String, String> {
    HashMap::from([(LABEL_MANAGED.to_owned(), "true".to_owned()), (LABEL_INSTANCE.to_owned(), instance.to_owned())])
}

/// Adds the labels of `role`.
pub fn put_role(labels: &mut HashMap<String, String>, role: &Role) {
    let (kind, part) = match role {
        Role::App => ("app", None),
        Role::Service(name) => ("service", Some(name)),
        Role::Job(name) => ("job", Some(name)),
        Role::SeedCopy(name) => ("seed-copy", Some(name)),
    };
    labels.insert(LABEL_ROLE.to_owned(), kind.to_owned());
    if let Some(part) = part {
        labels.insert(LABEL_PART.to_owned(), part.to_string());
    }
}

/// The role the labels say; `None` when they were tampered with.
pub fn role(labels: &HashMap<String, String>) -> Option<Role> {
    let part = || labels.get(LABEL_PART).and_then(|name| ServiceName::parse(name).ok());
    match labels.get(LABEL_ROLE).map(String::as_str) {
        None | Some("app") => Some(Role::App),
        Some("service") => part().map(Role::Service),
        Some("job") => part().map(Role::Job),
        Some("seed-copy") => part().map(Role::SeedCopy),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_reads_back_as_written() {
        let name = ServiceName::parse("db").unwrap();
        for role in [Role::App, Role::Service(name.clone()), Role::Job(name.clone()), Role::SeedCopy(name)] {
            let mut labels = HashMap::new();
            put_role(&mut labels, &role);
            assert_eq!(self::role(&labels), Some(role));
        }
    }

    #[test]
    fn a_container_without_a_role_is_an_app_and_a_bad_role_is_none() {
        assert_eq!(role(&HashMap::new()), Some(Role::App));
        let bad =
            HashMap::from([(LABEL_ROLE.to_owned(), "service".to_owned()), (LABEL_PART.to_owned(), "A B".to_owned())]);
        assert_eq!(role(&bad), None);
        assert_eq!(role(&HashMap::from([(LABEL_ROLE.to_owned(), "other".to_owned())])), None);
    }
}
