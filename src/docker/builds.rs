//! [`Images`] on Docker: builds through the engine's classic builder (`POST /build`, the context
//! streamed from its file), the images this instance built (found by their labels), their removal,
//! and the disk they take.
//!
//! A build's step images stay in the engine as the layer cache of the next build of the same
//! preview. When a build fails or is stopped, the image of the last step it finished is a
//! leftover: the lifecycle hands it to [`Images::prune_build_leftovers`], and Docker removes it
//! with its untagged parents unless another image still needs them.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{BuildImageOptions, ListImagesOptions, RemoveImageOptions};
use futures_util::StreamExt;
use tokio_util::io::ReaderStream;

use super::labels::{LABEL_BUILT, LABEL_INSTANCE, LABEL_SLUG};
use super::{DockerError, DockerRuntime, is_not_found};
use crate::preview::Slug;
use crate::runtime::{BuildError, BuildOutput, BuildPlan, BuiltImage, DiskUsage, ImageLabels, Images};

/// What a failed step's message is cut to (the full output is in the build log).
const MAX_FAILURE_MESSAGE: usize = 300;

/// The Dockerfile step a line of the classic builder's output begins: `Step 2/5 : RUN make`.
pub fn step_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("Step ")?;
    let (counter, _) = rest.split_once(" : ")?;
    counter.split_once('/').filter(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())?;
    Some(line.trim_end())
}

/// The image a step produced: ` ---> 3f2a1b4c5d6e` (not ` ---> Running in …`).
pub fn layer_of(line: &str) -> Option<&str> {
    let id = line.trim().strip_prefix("---> ")?;
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

impl DockerRuntime {
    fn built_filter(&self) -> HashMap<String, Vec<String>> {
        let labels = vec![format!("{LABEL_BUILT}=true"), format!("{LABEL_INSTANCE}={}", self.instance)];
        HashMap::from([("label".to_owned(), labels)])
    }

    /// `GET /system/df` read as the engine writes it: bollard's model is of a newer API than
    /// many engines speak, so the answer is read here as JSON. `None` when the engine is not on
    /// a local socket.
    async fn unique_image_bytes(&self) -> Option<u64> {
        let socket = std::env::var("DOCKER_HOST").ok().map_or_else(
            || Some("/var/run/docker.sock".to_owned()),
            |host| host.strip_prefix("unix://").map(str::to_owned),
        )?;
        let stream = tokio::net::UnixStream::connect(&socket).await.ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/system/df")
            .header("host", "docker")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let body = http_body_util::BodyExt::collect(response.into_body()).await.ok()?.to_bytes();
        let df: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let ours = |image: &&serde_json::Value| {
            image["Labels"][LABEL_BUILT] == "true" && image["Labels"][LABEL_INSTANCE] == self.instance.as_ref()
        };
        let images = df["Images"].as_array()?;
        Some(
            images
                .iter()
                .filter(ours)
                .map(|image| {
                    let size = image["Size"].as_i64().unwrap_or(0);
                    let shared = image["SharedSize"].as_i64().unwrap_or(0).max(0);
                    (size - shared).max(0) as u64
                })
                .sum(),
        )
    }

    /// Free bytes under Docker's data root, read here: only meaningful when the engine runs on
    /// this host (a local socket).
    async fn free_bytes(&self) -> Option<u64> {
        if std::env::var("DOCKER_HOST").is_ok_and(|host| !host.starts_with("unix://")) {
            return None;
        }
        let root = match self.data_root.get() {
            Some(root) => root.clone(),
            None => {
                let root = self.docker.info().await.ok()?.docker_root_dir?;
                self.data_root.get_or_init(|| root).clone()
            }
        };
        let stat = rustix::fs::statvfs(root.as_str()).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}

fn built_image(summary: bollard::models::ImageSummary) -> BuiltImage {
    let label = |key: &str| summary.labels.get(key).cloned();
    BuiltImage {
        slug: label(LABEL_SLUG).and_then(|s| Slug::parse(&s).ok()),
        created: summary.created,
        tags: summary.repo_tags.into_iter().filter(|t| t != "<none>:<none>").collect(),
        id: summary.id,
    }
}

fn truncate(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_FAILURE_MESSAGE) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[async_trait]
impl Images for DockerRuntime {
    fn image_labels(&self, slug: &Slug) -> ImageLabels {
        let pairs = vec![
            (LABEL_BUILT.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.instance.to_string()),
            (LABEL_SLUG.to_owned(), slug.to_string()),
        ];
        ImageLabels { pairs, reserved: super::labels::CONTAINER_LABELS.map(str::to_owned).to_vec() }
    }

    async fn tag_image(&self, image: &str, tag: &str) -> Result<(), DockerError> {
        let (repo, tag) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let options =
            bollard::query_parameters::TagImageOptions { repo: Some(repo.to_owned()), tag: Some(tag.to_owned()) };
        self.docker.tag_image(image, Some(options)).await.map_err(|err| DockerError::from_bollard("tag an image", err))
    }

    async fn build_image(
        &self,
        plan: &BuildPlan<'_>,
        context: tokio::fs::File,
        on_output: &mut (dyn FnMut(BuildOutput) + Send),
    ) -> Result<(), BuildError> {
        let options = BuildImageOptions {
            dockerfile: plan.dockerfile.to_owned(),
            t: Some(plan.tag.to_owned()),
            rm: true,
            forcerm: true,
            buildargs: Some(plan.args.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            cpushares: Some(i32::try_from(plan.cpu_shares).unwrap_or(i32::MAX)),
            // The API takes an int64; bollard's parameter is an i32, so at most 2 GiB - 1.
            memory: Some(i32::try_from(plan.memory).unwrap_or(i32::MAX)),
            networkmode: plan.network.map(str::to_owned),
            ..Default::default()
        };
        let body = bollard::body_try_stream(ReaderStream::new(context));
        // The engine connection's default timeout (2 min) would cut long builds; the lifecycle
        // bounds a build by `builds.timeout` instead.
        let docker = self.docker.clone().with_timeout(std::time::Duration::from_secs(24 * 3600));
        let mut stream = docker.build_image(options, None, Some(body));
        let mut step = String::from("the build");
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(BuildError::StepFailed { step, message: truncate(&error) });
                }
                Err(err) => return Err(DockerError::from_bollard("build the image", err).into()),
            };
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(BuildError::StepFailed { step, message: truncate(&detail) });
            }
            for line in info.stream.iter().flat_map(|text| text.lines()) {
                if let Some(begun) = step_of(line) {
                    step = begun.to_owned();
                    on_output(BuildOutput::Step(begun.to_owned()));
                } else if let Some(layer) = layer_of(line) {
                    on_output(BuildOutput::Layer(layer.to_owned()));
                    on_output(BuildOutput::Line(line.to_owned()));
                } else {
                    on_output(BuildOutput::Line(line.to_owned()));
                }
            }
        }
        Ok(())
    }

    async fn labels_of(&self, reference: &str) -> Result<HashMap<String, String>, DockerError> {
        let image = self
            .docker
            .inspect_image(reference)
            .await
            .map_err(|err| DockerError::from_bollard("inspect the built image", err))?;
        Ok(image.config.and_then(|config| config.labels).unwrap_or_default())
    }

    async fn built_images(&self) -> Result<Vec<BuiltImage>, DockerError> {
        let options = ListImagesOptions { filters: Some(self.built_filter()), ..Default::default() };
        let summaries = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|err| DockerError::from_bollard("list images", err))?;
        let mut images: Vec<BuiltImage> = summaries.into_iter().map(built_image).collect();
        images.sort_by_key(|image| std::cmp::Reverse(image.created));
        Ok(images)
    }

    async fn remove_image(&self, reference: &str) -> Result<(), DockerError> {
        let options = RemoveImageOptions { force: false, noprune: false, ..Default::default() };
        match self.docker.remove_image(reference, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            // Used by a container, or the parent of another image: it stays.
            Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(err) => Err(DockerError::from_bollard("remove an image", err)),
        }
    }

    async fn prune_build_leftovers(&self, leftovers: &[String], building: &[Slug]) -> Result<usize, DockerError> {
        let mut filters = self.built_filter();
        filters.insert("dangling".to_owned(), vec!["true".to_owned()]);
        let options = ListImagesOptions { filters: Some(filters), ..Default::default() };
        let dangling = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|err| DockerError::from_bollard("list images", err))?;
        let idle = |image: &&bollard::models::ImageSummary| {
            let slug = image.labels.get(LABEL_SLUG).and_then(|slug| Slug::parse(slug).ok());
            slug.is_none_or(|slug| !building.contains(&slug))
        };
        let mut removed = 0;
        let dangling = dangling.iter().filter(idle).map(|image| image.id.as_str());
        for id in dangling.chain(leftovers.iter().map(String::as_str)) {
            let tagged = match self.docker.inspect_image(id).await {
                Ok(image) => image.repo_tags.is_some_and(|tags| !tags.is_empty()),
                Err(err) if is_not_found(&err) => continue,
                Err(err) => return Err(DockerError::from_bollard("inspect an image", err)),
            };
            if !tagged {
                self.remove_image(id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn free_disk(&self) -> Option<u64> {
        self.free_bytes().await
    }

    async fn disk(&self) -> Result<DiskUsage, DockerError> {
        let (images_bytes, free_bytes) = tokio::join!(self.unique_image_bytes(), self.free_bytes());
        Ok(DiskUsage { images_bytes, free_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_layers_are_read_from_the_classic_builders_lines() {
        assert_eq!(step_of("Step 2/5 : RUN make\n"), Some("Step 2/5 : RUN make"));
        assert_eq!(step_of("Stepping out"), None);
        assert_eq!(step_of("Step x/5 : RUN"), None);
        assert_eq!(layer_of(" ---> 3f2a1b4c5d6e"), Some("3f2a1b4c5d6e"));
        assert_eq!(layer_of(" ---> Running in 3f2a1b4c5d6e"), None);
        assert_eq!(layer_of(" ---> Using cache"), None);
    }
}
