//! [`Images`] on Docker: builds through the engine's classic builder (`POST /build`, the context
//! streamed from its file), previewd's labels put on the result, the images this instance built
//! (found by their labels), their removal, and the disk they take.
//!
//! Labels are not a build step: on engines whose storage driver diffs naively (fuse-overlayfs,
//! vfs), every committed step ends on the next whole second (moby's `NaiveDiffDriver` sleeps
//! until then), so a `LABEL` step costs up to a second per build. Instead the built image's
//! config, with the labels added, is loaded as a new image (`POST /images/load` of a tar with
//! only a manifest and that config): the engine already has every layer, reads none, and writes
//! the config alone.
//!
//! The built image itself stays, untagged, as the layer cache of the next build of the preview
//! (its step images are its parents); the labelled image names it (`previewd.cache`) and it goes
//! with it. When a build fails or is stopped, the image of the last step it finished is a
//! leftover: the lifecycle hands it to [`Images::prune_build_leftovers`], and Docker removes it
//! with its untagged parents unless another image still needs them.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{BuildImageOptions, ListImagesOptions, RemoveImageOptions};
use futures_util::StreamExt;
use tokio_util::io::ReaderStream;

use super::labels::{LABEL_ADDED_BYTES, LABEL_BUILT, LABEL_CACHE, LABEL_INSTANCE, LABEL_SLUG};
use super::{DockerError, DockerRuntime, is_not_found};
use crate::preview::Slug;
use crate::runtime::{BuildError, BuildOutput, BuildPlan, BuiltImage, DiskUsage, Images};

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
        cache: label(LABEL_CACHE).filter(|id| !id.is_empty()),
        added_bytes: label(LABEL_ADDED_BYTES).and_then(|bytes| bytes.parse().ok()).unwrap_or(0),
        id: summary.id,
    }
}

/// The labels previewd reads off containers that `found` (a built image's) sets.
fn reserved_in(found: &HashMap<String, String>) -> Vec<String> {
    let mut reserved: Vec<String> =
        found.keys().filter(|key| super::labels::CONTAINER_LABELS.contains(&key.as_str())).cloned().collect();
    reserved.sort();
    reserved
}

/// The image config of the labelled image: the built image's architecture, OS, creation time,
/// author, container config (with `labels` added) and layers. Without history: the engine's
/// history API does not say which entries made a layer, and a wrong one breaks `docker history`.
fn labelled_config(built: &serde_json::Value, labels: &HashMap<String, String>) -> serde_json::Value {
    let mut config = built["Config"].clone();
    if !config.is_object() {
        config = serde_json::json!({});
    }
    let mut merged: serde_json::Map<String, serde_json::Value> =
        config["Labels"].as_object().cloned().unwrap_or_default();
    for (key, value) in labels {
        merged.insert(key.clone(), serde_json::Value::String(value.clone()));
    }
    config["Labels"] = serde_json::Value::Object(merged);
    let mut image = serde_json::json!({
        "architecture": built["Architecture"],
        "os": built["Os"],
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": built["RootFS"]["Layers"]},
    });
    for (key, from) in [("created", "Created"), ("author", "Author"), ("variant", "Variant")] {
        if built[from].is_string() {
            image[key] = built[from].clone();
        }
    }
    image
}

/// A tar `POST /images/load` reads as one image tagged `tag`: its manifest and config. The
/// layers it names are not in it; the engine reads a layer only when it does not have it.
fn load_archive(config: &[u8], tag: &str, layers: usize) -> std::io::Result<Vec<u8>> {
    use sha2::Digest;
    let config_name = format!("{}.json", hex::encode(sha2::Sha256::digest(config)));
    let layer_names: Vec<String> = (0..layers).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]);
    let manifest = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in [("manifest.json", manifest.as_slice()), (config_name.as_str(), config)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, data)?;
    }
    archive.into_inner()
}

/// The bytes a build added to its base: the layers of its history above the newest entry
/// that is a tagged image (the `FROM` image; all of them when there is none).
fn added_bytes(history: &[bollard::models::ImageHistoryResponseItem]) -> u64 {
    history
        .iter()
        .take_while(|entry| entry.tags.iter().all(|tag| tag == "<none>:<none>"))
        .map(|entry| u64::try_from(entry.size).unwrap_or(0))
        .sum()
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
    async fn label_image(&self, built: &str, slug: &Slug, tag: &str) -> Result<(), BuildError> {
        let (image, history) = tokio::join!(self.docker.inspect_image(built), self.docker.image_history(built));
        let image = image.map_err(|err| DockerError::from_bollard("inspect the built image", err))?;
        let reserved = reserved_in(image.config.as_ref().and_then(|c| c.labels.as_ref()).unwrap_or(&HashMap::new()));
        if !reserved.is_empty() {
            return Err(BuildError::ReservedLabels(reserved));
        }
        let history = history.map_err(|err| DockerError::from_bollard("read the image's history", err))?;
        let labels = HashMap::from([
            (LABEL_BUILT.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.instance.to_string()),
            (LABEL_SLUG.to_owned(), slug.to_string()),
            (LABEL_CACHE.to_owned(), image.id.clone().unwrap_or_else(|| built.to_owned())),
            (LABEL_ADDED_BYTES.to_owned(), added_bytes(&history).to_string()),
        ]);
        let layers = image.root_fs.as_ref().and_then(|fs| fs.layers.as_ref()).map_or(0, Vec::len);
        let failed = |err: &dyn std::fmt::Display| DockerError::Api {
            action: "label the built image",
            message: err.to_string(),
        };
        let built_json = serde_json::to_value(&image).map_err(|err| failed(&err))?;
        let config = serde_json::to_vec(&labelled_config(&built_json, &labels)).map_err(|err| failed(&err))?;
        let archive = load_archive(&config, tag, layers).map_err(|err| failed(&err))?;
        let options = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
        let mut stream = self.docker.import_image(options, bollard::body_full(archive.into()), None);
        while let Some(item) = stream.next().await {
            item.map_err(|err| DockerError::from_bollard("load the labelled image", err))?;
        }
        Ok(())
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
    ) -> Result<String, BuildError> {
        let options = BuildImageOptions {
            dockerfile: plan.dockerfile.to_owned(),
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
        let mut built = None;
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
            if let Some(id) = info.aux.and_then(|aux| aux.id) {
                built = Some(id);
            }
            for line in info.stream.iter().flat_map(|text| text.lines()) {
                if let Some(begun) = step_of(line) {
                    step = begun.to_owned();
                    on_output(BuildOutput::Step(begun.to_owned()));
                } else if let Some(layer) = layer_of(line) {
                    on_output(BuildOutput::Layer(layer.to_owned()));
                    on_output(BuildOutput::Line(line.to_owned()));
                } else if let Some(id) = line.strip_prefix("Successfully built ") {
                    built.get_or_insert_with(|| id.trim().to_owned());
                    on_output(BuildOutput::Line(line.to_owned()));
                } else {
                    on_output(BuildOutput::Line(line.to_owned()));
                }
            }
        }
        built.ok_or_else(|| BuildError::StepFailed { step, message: "the engine named no built image".to_owned() })
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

    async fn remove_built(&self, image: &BuiltImage, others: &[BuiltImage]) -> Result<(), DockerError> {
        for tag in &image.tags {
            self.remove_image(tag).await?;
        }
        if image.tags.is_empty() {
            self.remove_image(&image.id).await?;
        }
        let shared =
            |cache: &String| others.iter().any(|other| other.id != image.id && other.cache.as_ref() == Some(cache));
        match &image.cache {
            Some(cache) if !shared(cache) => self.remove_image(cache).await,
            _ => Ok(()),
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
        let kept = self.built_images().await?;
        let mut removed = 0;
        let dangling = dangling.iter().filter(idle).map(|image| (image.id.as_str(), image.labels.get(LABEL_CACHE)));
        for (id, cache) in dangling.chain(leftovers.iter().map(|id| (id.as_str(), None))) {
            let tagged = match self.docker.inspect_image(id).await {
                Ok(image) => image.repo_tags.is_some_and(|tags| !tags.is_empty()),
                Err(err) if is_not_found(&err) => continue,
                Err(err) => return Err(DockerError::from_bollard("inspect an image", err)),
            };
            if tagged {
                continue;
            }
            self.remove_image(id).await?;
            removed += 1;
            // A labelled image whose tag moved: its build's image goes too, unless another
            // labelled image still names it.
            if let Some(cache) =
                cache.filter(|cache| !kept.iter().any(|other| other.id != id && other.cache.as_ref() == Some(*cache)))
            {
                self.remove_image(cache).await?;
            }
        }
        Ok(removed)
    }

    async fn free_disk(&self) -> Option<u64> {
        self.free_bytes().await
    }

    async fn disk(&self) -> Result<DiskUsage, DockerError> {
        let (images, free_bytes) = tokio::join!(self.built_images(), self.free_bytes());
        let images_bytes = images?.iter().map(|image| image.added_bytes).sum();
        Ok(DiskUsage { images_bytes: Some(images_bytes), free_bytes })
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

    #[test]
    fn the_labelled_config_is_the_built_ones_with_previewds_labels_winning() {
        let built = serde_json::json!({
            "Id": "sha256:abc",
            "Architecture": "amd64",
            "Os": "linux",
            "Created": "2026-12-06T07:00:00Z",
            "Config": {"Cmd": ["httpd"], "ExposedPorts": {"3000/tcp": {}}, "Labels": {"team": "web", "previewd.slug": "x"}},
            "RootFS": {"Type": "layers", "Layers": ["sha256:1", "sha256:2"]},
        });
        let labels = HashMap::from([("previewd.slug".to_owned(), "mine".to_owned())]);
        let config = labelled_config(&built, &labels);
        assert_eq!(config["config"]["Labels"], serde_json::json!({"team": "web", "previewd.slug": "mine"}));
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["httpd"]));
        assert_eq!(config["config"]["ExposedPorts"], serde_json::json!({"3000/tcp": {}}));
        assert_eq!(config["rootfs"], serde_json::json!({"type": "layers", "diff_ids": ["sha256:1", "sha256:2"]}));
        assert_eq!((config["architecture"].as_str(), config["os"].as_str()), (Some("amd64"), Some("linux")));
        assert_eq!(config["created"], "2026-12-06T07:00:00Z");
        assert!(config.get("author").is_none() && config.get("history").is_none(), "{config}");
    }

    #[test]
    fn the_load_archive_holds_a_manifest_naming_the_config_by_its_digest_and_no_layer() {
        use std::io::Read;
        let archive = load_archive(b"{\"os\":\"linux\"}", "previewd-x/upload/a:1", 2).unwrap();
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut files = HashMap::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            files.insert(entry.path().unwrap().display().to_string(), text);
        }
        let manifest: serde_json::Value = serde_json::from_str(&files["manifest.json"]).unwrap();
        let config_name = manifest[0]["Config"].as_str().unwrap();
        assert_eq!(files[config_name], "{\"os\":\"linux\"}");
        assert_eq!(config_name.len(), 64 + ".json".len(), "{config_name}");
        assert_eq!(manifest[0]["RepoTags"], serde_json::json!(["previewd-x/upload/a:1"]));
        assert_eq!(manifest[0]["Layers"].as_array().map(Vec::len), Some(2));
        assert_eq!(files.len(), 2, "no layer in it: {:?}", files.keys());
    }

    fn entry(size: i64, tags: &[&str]) -> bollard::models::ImageHistoryResponseItem {
        bollard::models::ImageHistoryResponseItem {
            size,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_build_adds_the_layers_above_its_tagged_base() {
        let history =
            [entry(10, &[]), entry(5, &["<none>:<none>"]), entry(100, &["previewd-demo:latest"]), entry(7, &[])];
        assert_eq!(added_bytes(&history), 15);
        assert_eq!(added_bytes(&history[2..]), 0, "the base itself adds nothing");
        assert_eq!(added_bytes(&[entry(3, &[]), entry(4, &[])]), 7, "no tagged base: all of it");
    }

    #[test]
    fn reserved_labels_are_found_and_others_allowed() {
        let found = HashMap::from([
            ("previewd.owner".to_owned(), "x".to_owned()),
            ("previewd.pr".to_owned(), "7".to_owned()),
            ("org.opencontainers.image.title".to_owned(), "shop".to_owned()),
        ]);
        assert_eq!(reserved_in(&found), vec!["previewd.owner".to_owned(), "previewd.pr".to_owned()]);
    }
}
