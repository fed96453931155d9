//! Builds of previews from source: the queue that lets `builds.max_parallel` run at once, latest
//! wins (a newer build of a preview stops the one in flight and drops a queued one), the build
//! log kept per preview, the reuse of the last image when `build.paths` did not change, the
//! images kept per preview (`builds.keep`), and the disk they take.
//!
//! Where the source comes from is the caller's (GitHub's tarball, an upload): [`context`] turns
//! it into Docker's build context; the engine builds through [`crate::runtime::Images`].

pub mod context;
pub mod dockerignore;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::repo_file::{self, RepoFileError};
use crate::config::{BuildSpec, BuildsConfig, ImageSpec};
use crate::metrics::Metrics;
use crate::network::Networks;
use crate::preview::{InstanceName, Slug};
use crate::runtime::{BuildError, BuildOutput, BuildPlan, BuiltImage, DiskUsage, DockerError, Runtime};
use context::{ContextError, Layout};
use dockerignore::Ignore;

/// Lines of a build's log kept (the oldest go first); a build log is for reading, not archiving.
const MAX_LOG_LINES: usize = 5000;
/// How long a reading of the disk is reused by `/healthz` and `/metrics`.
const DISK_READING_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BuildFailure {
    #[error(transparent)]
    RepoFile(#[from] RepoFileError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("the build failed at {step}: {message}")]
    Step { step: String, message: String },
    #[error("the build did not finish within builds.timeout ({0:?}); it was stopped")]
    TimedOut(Duration),
    #[error("a newer build of this preview replaced this one")]
    Superseded,
    #[error("the preview was removed while it was being built")]
    Removed,
    #[error(
        "the Dockerfile may not set the previewd.* labels previewd reads (slug, owner, pr, repo, network, ...); it sets {}",
        .0.join(", ")
    )]
    ReservedLabels(Vec<String>),
    #[error("no network for the build's steps: {0}")]
    NoNetwork(String),
    #[error(
        "Docker's disk has {free} bytes free, and this build needs builds.min_free_disk ({min}) plus its context ({context}); remove old images or lower builds.min_free_disk"
    )]
    DiskLow { free: u64, min: u64, context: u64 },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot prepare the build: {0}")]
    Io(String),
    #[error("cannot download the commit's source from GitHub: {0}")]
    Download(String),
    #[error("the context's .dockerignore: {0}")]
    Dockerignore(String),
}

impl BuildFailure {
    /// The failing Dockerfile step, for a pull request's status.
    pub fn step(&self) -> Option<&str> {
        match self {
            Self::Step { step, .. } => Some(step),
            _ => None,
        }
    }
}

/// The source of a build: an archive on disk.
pub struct SourceArchive {
    pub file: tempfile::TempPath,
    pub layout: Layout,
}

/// One build to run, as the lifecycle asks for it.
pub struct BuildInput {
    pub source: SourceArchive,
    pub build: BuildSpec,
    /// What is built: a commit sha, or the digest of an upload.
    pub revision: String,
    /// The repository part of the image's name: `acme/shop`, or `upload/<slug>`.
    pub repository: String,
    /// Whether the source's own `.previewd.yml` applies.
    pub repo_file: bool,
    /// From [`Builds::claim`]: stopped when a newer build of the preview comes.
    pub claim: Claim,
}

/// A preview's turn to build one revision; cancelled when a newer build of it is claimed, or
/// the preview is removed.
#[derive(Clone)]
pub struct Claim {
    id: u64,
    pub cancel: CancellationToken,
    /// Set when the preview is removed, before `cancel`: the stopped build says why.
    removed: Arc<std::sync::atomic::AtomicBool>,
}

impl Claim {
    /// Why the build stopped, once `cancel` is cancelled.
    pub fn stopped(&self) -> BuildFailure {
        if self.removed.load(std::sync::atomic::Ordering::Relaxed) {
            BuildFailure::Removed
        } else {
            BuildFailure::Superseded
        }
    }

    fn remove(&self) {
        self.removed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cancel.cancel();
    }
}

/// Where a build is, for `GET /api/builds`, the CLI and the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct BuildStatus {
    pub name: Slug,
    pub revision: String,
    /// `preparing`, `queued`, `building`, or `launching` (built; the launch waits for the
    /// preview's lock).
    pub state: &'static str,
    /// The Dockerfile step being run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Unix seconds.
    pub started: i64,
}

impl From<BuildError> for BuildFailure {
    fn from(err: BuildError) -> Self {
        match err {
            BuildError::StepFailed { step, message } => Self::Step { step, message },
            BuildError::ReservedLabels(labels) => Self::ReservedLabels(labels),
            BuildError::Docker(err) => Self::Docker(err),
        }
    }
}

struct InFlight {
    claim: Claim,
    revision: String,
    status: BuildStatus,
    log: Vec<String>,
}

#[derive(Clone)]
pub struct Builds {
    config: BuildsConfig,
    instance: InstanceName,
    logs_dir: PathBuf,
    temp_dir: PathBuf,
    runtime: Arc<dyn Runtime>,
    /// A build's `RUN` steps run on a preview network of their own, behind its firewall.
    networks: Networks,
    metrics: Arc<Metrics>,
    turns: Arc<Semaphore>,
    claims: Arc<std::sync::atomic::AtomicU64>,
    /// The head commit each pull request's preview should build (see `supersede`).
    wanted: Arc<Mutex<HashMap<Slug, String>>>,
    /// Leftovers of stopped builds whose preview was building again when they were pruned.
    deferred: Arc<Mutex<Vec<(Slug, String)>>>,
    in_flight: Arc<Mutex<HashMap<Slug, InFlight>>>,
    /// Held while a build log file is written or removed, so that a kill's removal cannot
    /// come between a stopped build's last look at its entry and its write.
    log_files: Arc<Mutex<()>>,
    disk: Arc<Mutex<Option<(Instant, DiskUsage)>>>,
}

/// Docker's image names allow `[a-z0-9]` separated by `.`, `_`, `__` or `-` runs in each `/` part.
fn image_part(text: &str) -> String {
    let mut part: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    while part.ends_with(['.', '_', '-']) {
        part.pop();
    }
    let start = part.find(|c: char| c.is_ascii_alphanumeric()).unwrap_or(part.len());
    let trimmed = &part[start..];
    if trimmed.is_empty() { "x".to_owned() } else { trimmed.replace("..", ".").replace("--", "-") }
}

/// `previewd-<instance>/<repository>:<revision, 12 characters>`.
pub fn image_tag(instance: &InstanceName, repository: &str, revision: &str) -> String {
    let repository: Vec<String> = repository.split('/').map(image_part).collect();
    let tag: String = revision.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
    format!("previewd-{}/{}:{}", image_part(instance.as_ref()), repository.join("/"), tag.to_ascii_lowercase())
}

/// The images of a preview to remove so that `keep` remain: the newest ones and any in use (by
/// id or tag) stay.
pub fn beyond_keep<'a>(images: &'a [BuiltImage], keep: usize, in_use: &[String]) -> Vec<&'a str> {
    let used = |image: &BuiltImage| in_use.contains(&image.id) || image.tags.iter().any(|tag| in_use.contains(tag));
    let mut kept = 0;
    let mut removed = Vec::new();
    for image in images {
        if used(image) || kept < keep {
            kept += 1;
        } else {
            removed.push(image.id.as_str());
        }
    }
    removed
}

impl Builds {
    pub fn new(
        config: BuildsConfig,
        instance: InstanceName,
        state_dir: &Path,
        runtime: Arc<dyn Runtime>,
        networks: Networks,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            turns: Arc::new(Semaphore::new(config.max_parallel)),
            config,
            instance,
            logs_dir: state_dir.join("build-logs"),
            temp_dir: state_dir.join("build-tmp"),
            runtime,
            networks,
            metrics,
            claims: Arc::default(),
            wanted: Arc::default(),
            deferred: Arc::default(),
            in_flight: Arc::default(),
            log_files: Arc::default(),
            disk: Arc::default(),
        }
    }

    pub fn config(&self) -> &BuildsConfig {
        &self.config
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<Slug, InFlight>> {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a preview's build of `revision`: any build of the preview still in flight (or
    /// queued) is stopped, since the newest source wins. The token stops this one in turn.
    pub fn claim(&self, slug: &Slug, revision: &str) -> Claim {
        let id = self.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let claim = Claim { id, cancel: CancellationToken::new(), removed: Arc::default() };
        // `wanted`, then `in_flight`, held together (as `supersede` does): a push between the
        // check and the insert would otherwise find nothing to stop.
        let wanted = self.wanted();
        let mut in_flight = self.in_flight();
        // A push that came before this build claimed its turn (see `supersede`) stops it at once.
        if wanted.get(slug).is_some_and(|wanted| wanted != revision) {
            tracing::info!(%slug, revision, "a newer push came before this build started; not building it");
            claim.cancel.cancel();
            return claim;
        }
        let status = BuildStatus {
            name: slug.clone(),
            revision: revision.to_owned(),
            state: "preparing",
            step: None,
            started: crate::clock::unix_now(),
        };
        let entry = InFlight { claim: claim.clone(), revision: revision.to_owned(), status, log: Vec::new() };
        if let Some(older) = in_flight.insert(slug.clone(), entry) {
            tracing::info!(%slug, older = %older.revision, newer = revision, "a newer build replaces the one in flight");
            older.claim.cancel.cancel();
        }
        claim
    }

    fn wanted(&self) -> std::sync::MutexGuard<'_, HashMap<Slug, String>> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pull request's head is now `revision`: its build in flight of any other commit stops,
    /// and so does one of another commit that claims its turn later.
    pub fn supersede(&self, slug: &Slug, revision: &str) {
        let mut wanted = self.wanted();
        let in_flight = self.in_flight();
        wanted.insert(slug.clone(), revision.to_owned());
        if let Some(entry) = in_flight.get(slug).filter(|entry| entry.revision != revision) {
            tracing::info!(%slug, older = %entry.revision, newer = revision, "a push makes the build in flight stale");
            entry.claim.cancel.cancel();
        }
    }

    /// Stops the preview's build in flight, whatever it builds: the preview is being removed.
    /// Whether there was one.
    pub fn cancel(&self, slug: &Slug) -> bool {
        self.wanted().remove(slug);
        let in_flight = self.in_flight();
        let entry = in_flight.get(slug);
        if let Some(entry) = entry {
            entry.claim.remove();
        }
        entry.is_some()
    }

    /// Builds in flight and queued, oldest first.
    pub fn statuses(&self) -> Vec<BuildStatus> {
        let mut statuses: Vec<BuildStatus> = self.in_flight().values().map(|entry| entry.status.clone()).collect();
        statuses.sort_by_key(|status| status.started);
        statuses
    }

    fn update(&self, slug: &Slug, claim: &Claim, change: impl FnOnce(&mut InFlight)) {
        if let Some(entry) = self.in_flight().get_mut(slug).filter(|entry| entry.claim.id == claim.id) {
            change(entry);
        }
    }

    fn log_path(&self, slug: &Slug) -> PathBuf {
        self.logs_dir.join(format!("{slug}.log"))
    }

    /// Whether the preview has a build log (a build in flight, it was built, or a first build
    /// failed): `log` without reading the file.
    pub fn has_log(&self, slug: &Slug) -> bool {
        self.in_flight().get(slug).is_some_and(|entry| !entry.log.is_empty()) || self.log_path(slug).exists()
    }

    /// The log of the preview's build in flight, or else of its last build.
    pub fn log(&self, slug: &Slug) -> Option<String> {
        if let Some(entry) = self.in_flight().get(slug).filter(|entry| !entry.log.is_empty()) {
            return Some(entry.log.join("\n") + "\n");
        }
        std::fs::read_to_string(self.log_path(slug)).ok()
    }

    /// Ends the in-flight entry of a build (also one that failed before it ran, e.g. its
    /// download), keeping its log, with `outcome` last, as the preview's last build log.
    pub fn finish(&self, slug: &Slug, claim: &Claim, outcome: &str) {
        self.keep_log(slug, claim, outcome);
        self.release(slug, claim);
    }

    /// The build is over (its image goes on to launch): it stops showing as in flight, and a
    /// kill no longer has a build to stop.
    pub fn release(&self, slug: &Slug, claim: &Claim) {
        let mut in_flight = self.in_flight();
        if in_flight.get(slug).is_some_and(|entry| entry.claim.id == claim.id) {
            in_flight.remove(slug);
        }
    }

    /// Writes the build's log so far, with `outcome` last, as the preview's last build log.
    fn keep_log(&self, slug: &Slug, claim: &Claim, outcome: &str) {
        let _files = self.log_files.lock().unwrap_or_else(PoisonError::into_inner);
        let log = {
            let mut in_flight = self.in_flight();
            match in_flight.get_mut(slug) {
                Some(entry) if entry.claim.id == claim.id => {
                    push_line(&mut entry.log, format!("previewd: {outcome}"));
                    Some(entry.log.clone())
                }
                _ => None,
            }
        };
        let Some(log) = log else { return };
        let path = self.log_path(slug);
        let written = std::fs::create_dir_all(&self.logs_dir)
            .and_then(|()| crate::nginx::sites::write_atomic(&path, (log.join("\n") + "\n").as_bytes()));
        if let Err(err) = written {
            tracing::warn!(path = %path.display(), error = %err, "cannot keep the build log");
        }
    }

    /// Prepares and runs a build: the repository's file applied to `spec`, the context written,
    /// a turn waited for, the image built. Returns the image to run. `on_step` hears each step.
    pub async fn run(
        &self,
        slug: &Slug,
        input: BuildInput,
        spec: &mut ImageSpec,
        on_step: &mut (dyn FnMut(&'static str, String) + Send),
    ) -> Result<String, BuildFailure> {
        let claim = input.claim.clone();
        let started = Instant::now();
        // Outlives `run_inner`, which a stop drops half-way: the image of the last step that
        // finished, removed if the build does not. Also written down, for a crash (`recover`).
        let last_layer = Mutex::new(None);
        let leftover_file = self.leftover_path(slug, &claim);
        let result = tokio::select! {
            // A stop wins over whatever the build was doing when it came.
            biased;
            () = claim.cancel.cancelled() => Err(claim.stopped()),
            result = self.run_inner(slug, input, spec, on_step, &last_layer, &leftover_file) => result,
        };
        std::fs::remove_file(&leftover_file).ok();
        let result = match result {
            Err(BuildFailure::Context(ContextError::Stopped)) => Err(claim.stopped()),
            other => other,
        };
        match &result {
            Ok(tag) => {
                self.keep_log(slug, &claim, &format!("built {tag} in {:.1} s", started.elapsed().as_secs_f64()));
                self.update(slug, &claim, |entry| entry.status.state = "launching");
            }
            Err(err) => {
                self.finish(slug, &claim, &format!("failed: {err}"));
                let leftover = last_layer.lock().unwrap_or_else(PoisonError::into_inner).take();
                self.prune(leftover.map(|id| (slug.clone(), id)).into_iter().collect());
            }
        }
        let label = match &result {
            Ok(_) => "success",
            Err(BuildFailure::Superseded) => "superseded",
            Err(BuildFailure::Removed) => "removed",
            Err(_) => "failure",
        };
        self.metrics.builds.get_or_create(&crate::metrics::ByResult { result: label }).inc();
        if result.is_ok() {
            self.metrics.build_seconds.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn run_inner(
        &self,
        slug: &Slug,
        input: BuildInput,
        spec: &mut ImageSpec,
        on_step: &mut (dyn FnMut(&'static str, String) + Send),
        last_layer: &Mutex<Option<String>>,
        leftover_file: &Path,
    ) -> Result<String, BuildFailure> {
        let claim = input.claim.clone();
        // What previewd says of the build goes to its log too.
        let mut on_step = |step: &'static str, message: String| {
            // Docker's own `Step n/m` lines are in the log already, as Docker wrote them.
            if !message.starts_with("Step ") {
                self.update(slug, &claim, |entry| push_line(&mut entry.log, format!("previewd: {message}")));
            }
            on_step(step, message);
        };
        let on_step: &mut (dyn FnMut(&'static str, String) + Send) = &mut on_step;
        let mut build = input.build.clone();
        if input.repo_file {
            let text = self.read_repo_file(&input.source).await?;
            if let Some(text) = text {
                on_step("build", format!("applying the repository's {}", repo_file::REPO_FILE));
                repo_file::apply(&text, spec, &mut build)?;
            }
        }
        let ignore = self.read_dockerignore(&input.source, &build).await?;
        let context = self.write_context(&input.source, &build, ignore, &claim).await?;
        let tag = image_tag(&self.instance, &input.repository, &input.revision);
        let reuse_tag = context.summary.paths_digest.as_ref().map(|digest| self.reuse_tag(slug, &build, digest));
        let repository_prefix = image_tag(&self.instance, &input.repository, "");
        if let Some(reuse_tag) = &reuse_tag
            && let Some(image) = self.reusable(slug, reuse_tag, &repository_prefix).await?
        {
            on_step("build", format!("no change in build.paths since {image}: reusing it"));
            return Ok(image);
        }
        let _turn = self.wait_turn(slug, &claim, on_step).await;
        // Checked once the turn comes: builds ahead of this one may have taken the room.
        self.check_disk(context.summary.bytes).await?;
        self.update(slug, &claim, |entry| entry.status.state = "building");
        on_step(
            "build",
            format!(
                "building {tag} ({} files, {} KiB of context)",
                context.summary.files,
                context.summary.bytes / 1024
            ),
        );
        let file = tokio::fs::File::open(&context.file).await.map_err(|err| BuildFailure::Io(err.to_string()))?;
        let dockerfile = build.dockerfile.to_string();
        let network = self.build_network().await?;
        if let Some(network) = &network {
            self.update(slug, &claim, |entry| {
                push_line(&mut entry.log, format!("previewd: RUN steps run on the network {}", network.name));
            });
        }
        let plan = BuildPlan {
            slug,
            dockerfile: &dockerfile,
            args: &build.args,
            cpu_shares: self.config.cpu_shares,
            memory: self.config.memory,
            network: network.as_ref().map(|n| n.name.as_str()),
        };
        let mut on_output = |output: BuildOutput| match output {
            BuildOutput::Step(step) => {
                self.update(slug, &claim, |entry| {
                    entry.status.step = Some(step.clone());
                    push_line(&mut entry.log, step.clone());
                });
                on_step("build", step);
            }
            BuildOutput::Layer(id) => {
                if let Err(err) = crate::nginx::sites::write_atomic(leftover_file, id.as_bytes()) {
                    tracing::warn!(path = %leftover_file.display(), error = %err, "cannot note a build's step image");
                }
                *last_layer.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
            }
            BuildOutput::Line(line) => self.update(slug, &claim, |entry| push_line(&mut entry.log, line)),
        };
        let built =
            tokio::time::timeout(self.config.timeout, self.runtime.build_image(&plan, file, &mut on_output)).await;
        let built = match built {
            Ok(result) => result.map_err(BuildFailure::from)?,
            Err(_) => return Err(BuildFailure::TimedOut(self.config.timeout)),
        };
        if let Err(err) = self.runtime.label_image(&built, slug, &tag).await {
            // Removed with its step images: nothing of a refused build stays.
            self.runtime.remove_image(&built).await?;
            return Err(err.into());
        }
        if let Some(reuse_tag) = &reuse_tag {
            self.runtime.tag_image(&tag, reuse_tag).await?;
        }
        Ok(tag)
    }

    /// The second tag of a build with `build.paths`: `previewd-<instance>/reuse/<slug>:<key>`,
    /// the key being what decides the image besides the files outside the paths. A later push
    /// with the same key runs the image that has it instead of building.
    fn reuse_tag(&self, slug: &Slug, build: &BuildSpec, paths_digest: &str) -> String {
        format!(
            "{}:{}",
            image_tag(&self.instance, &format!("reuse/{slug}"), "").trim_end_matches(':'),
            reuse_key(build, paths_digest)
        )
    }

    /// With `network.isolation`, a network of the preview pool for the build's `RUN` steps: a
    /// pull request's Dockerfile is its author's code, and gets no more of the host than its
    /// preview does. Removed when the build ends (however it ends).
    async fn build_network(&self) -> Result<Option<BuildNetwork>, BuildFailure> {
        if !self.networks.enabled() {
            return Ok(None);
        }
        // A build takes minutes: the pool refills at once (the refill is dropped here).
        let (name, _) = self.networks.lease().await.map_err(|err| BuildFailure::NoNetwork(err.to_string()))?;
        Ok(Some(BuildNetwork { name, networks: self.networks.clone() }))
    }

    /// The context's `.dockerignore` (none: nothing left out).
    async fn read_dockerignore(&self, source: &SourceArchive, build: &BuildSpec) -> Result<Ignore, BuildFailure> {
        let path = source.file.to_path_buf();
        let layout = source.layout;
        let context = build.context.clone();
        let text = blocking(move || {
            let file = std::fs::File::open(&path).map_err(ContextError::Read)?;
            context::read_dockerignore(layout, std::io::BufReader::new(file), &context)
        })
        .await?;
        match text {
            None => Ok(Ignore::empty()),
            Some(text) => Ignore::parse(&text).map_err(|err| BuildFailure::Dockerignore(err.to_string())),
        }
    }

    async fn read_repo_file(&self, source: &SourceArchive) -> Result<Option<String>, BuildFailure> {
        let path = source.file.to_path_buf();
        let layout = source.layout;
        blocking(move || {
            let file = std::fs::File::open(&path).map_err(ContextError::Read)?;
            context::read_repo_file(layout, std::io::BufReader::new(file))
        })
        .await
    }

    /// The build context: the source's `context` directory, without what `.dockerignore` leaves out.
    async fn write_context(
        &self,
        source: &SourceArchive,
        build: &BuildSpec,
        ignore: Ignore,
        claim: &Claim,
    ) -> Result<PreparedContext, BuildFailure> {
        let path = source.file.to_path_buf();
        let layout = source.layout;
        let build = build.clone();
        let max_context = self.config.max_context;
        let cancel = claim.cancel.clone();
        let temp_dir = self.temp_dir().map_err(|err| BuildFailure::Io(err.to_string()))?;
        blocking(move || {
            let out = tempfile::NamedTempFile::new_in(&temp_dir).map_err(ContextError::Write)?;
            let stopped = || cancel.is_cancelled();
            let file = std::fs::File::open(&path).map_err(ContextError::Read)?;
            let writer = std::io::BufWriter::new(out.as_file());
            let plan = context::ContextPlan {
                context: &build.context,
                ignore: &ignore,
                stopped: &stopped,
                dockerfile: &build.dockerfile,
                paths: build.paths.as_ref(),
                max_context,
            };
            let summary = context::write_context(layout, std::io::BufReader::new(file), &plan, writer)?;
            Ok(PreparedContext { file: out.into_temp_path(), summary })
        })
        .await
    }

    /// A built image of the preview with the same reuse tag, tagged for the same repository
    /// (`prefix`), if one is still there.
    async fn reusable(&self, slug: &Slug, reuse_tag: &str, prefix: &str) -> Result<Option<String>, BuildFailure> {
        let images = self.runtime.built_images().await?;
        Ok(images
            .into_iter()
            .filter(|image| image.slug.as_ref() == Some(slug) && image.tags.iter().any(|tag| tag == reuse_tag))
            .find_map(|image| image.tags.into_iter().find(|tag| tag.starts_with(prefix))))
    }

    /// Where a build notes the image of its last finished step while it runs:
    /// `<temp_dir>/<slug>.<claim>.leftover`.
    fn leftover_path(&self, slug: &Slug, claim: &Claim) -> PathBuf {
        self.temp_dir.join(format!("{slug}.{}.{LEFTOVER_EXTENSION}", claim.id))
    }

    /// At start, before anything builds: what builds cut short by a crash left behind. The step
    /// images they noted are pruned (with their untagged parents), and the sources and contexts
    /// they were writing are deleted.
    pub fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(&self.temp_dir) else { return };
        let mut leftovers = Vec::new();
        for path in entries.flatten().map(|entry| entry.path()) {
            if let Some(leftover) = read_leftover(&path) {
                leftovers.push(leftover);
            }
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove what a build left");
            }
        }
        if !leftovers.is_empty() {
            tracing::info!(images = leftovers.len(), "removing the step images of builds a stop cut short");
            self.prune(leftovers);
        }
    }

    /// Where sources and contexts are kept while a build needs them: under `state_dir`, on the
    /// disk, not in `/tmp` (often memory).
    pub fn temp_dir(&self) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.temp_dir)?;
        Ok(self.temp_dir.clone())
    }

    async fn check_disk(&self, context: u64) -> Result<(), BuildFailure> {
        match self.runtime.free_disk().await {
            Some(free) if free < self.config.min_free_disk.saturating_add(context) => {
                Err(BuildFailure::DiskLow { free, min: self.config.min_free_disk, context })
            }
            _ => Ok(()),
        }
    }

    async fn wait_turn(
        &self,
        slug: &Slug,
        claim: &Claim,
        on_step: &mut (dyn FnMut(&'static str, String) + Send),
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(turn) = Arc::clone(&self.turns).try_acquire_owned() {
            return Some(turn);
        }
        self.update(slug, claim, |entry| entry.status.state = "queued");
        let ahead =
            self.statuses().iter().filter(|s| matches!(s.state, "queued" | "building")).count().saturating_sub(1);
        on_step(
            "queue",
            format!(
                "waiting for a build turn: {} build(s) ahead (builds.max_parallel is {})",
                ahead, self.config.max_parallel
            ),
        );
        Arc::clone(&self.turns).acquire_owned().await.ok()
    }

    /// Removes, in the background, what failed builds left and the dangling images of builds.
    /// A stopped build's step container still uses its last image for a moment (Docker removes
    /// it after the build's answer ends), so leftovers are tried again until they are gone.
    ///
    /// A leftover of a preview that builds again meanwhile is kept for a later prune: the new
    /// build may be using it from the layer cache.
    fn prune(&self, mut leftovers: Vec<(Slug, String)>) {
        const ATTEMPTS: usize = 10;
        leftovers.append(&mut self.deferred.lock().unwrap_or_else(PoisonError::into_inner));
        let (builds, runtime) = (self.clone(), Arc::clone(&self.runtime));
        tokio::spawn(async move {
            let building: Vec<Slug> = builds.statuses().into_iter().map(|status| status.name).collect();
            let (busy, leftovers): (Vec<_>, Vec<_>) =
                leftovers.into_iter().partition(|(slug, _)| building.contains(slug));
            // Left for the next prune: a build of the same preview may be using them.
            builds.deferred.lock().unwrap_or_else(PoisonError::into_inner).extend(busy);
            for _ in 0..ATTEMPTS {
                let building: Vec<Slug> = builds.statuses().into_iter().map(|status| status.name).collect();
                let idle: Vec<String> =
                    leftovers.iter().filter(|(slug, _)| !building.contains(slug)).map(|(_, id)| id.clone()).collect();
                if let Err(err) = runtime.prune_build_leftovers(&idle, &building).await {
                    return tracing::warn!(error = %err, "cannot prune what builds left");
                }
                let mut remaining = 0;
                for id in &idle {
                    remaining += usize::from(runtime.has_image(id).await.unwrap_or(false));
                }
                if remaining == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::warn!(images = ?leftovers, "a stopped build's last step image is still in use; `docker image prune` removes it later");
        });
    }

    /// After a launch of `slug` that runs `in_use`: its images beyond `builds.keep` are removed.
    pub async fn keep(&self, slug: &Slug, in_use: &[String]) {
        let images = match self.runtime.built_images().await {
            Ok(images) => images,
            Err(err) => return tracing::warn!(%slug, error = %err, "cannot list built images"),
        };
        let of_slug: Vec<_> = images.iter().filter(|image| image.slug.as_ref() == Some(slug)).cloned().collect();
        for id in beyond_keep(&of_slug, self.config.keep, in_use) {
            let Some(image) = of_slug.iter().find(|image| image.id == id) else { continue };
            match self.runtime.remove_built(image, &images).await {
                Ok(()) => tracing::info!(%slug, image = id, "removed a build beyond builds.keep"),
                Err(err) => tracing::warn!(%slug, image = id, error = %err, "cannot remove an old build"),
            }
        }
        self.prune(Vec::new());
    }

    /// The preview is gone: its build in flight stops (and leaves no log behind), its images and
    /// build log go too.
    pub async fn forget(&self, slug: &Slug) {
        self.wanted().remove(slug);
        {
            let _files = self.log_files.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = self.in_flight().remove(slug) {
                entry.claim.remove();
            }
            std::fs::remove_file(self.log_path(slug)).ok();
        }
        match self.runtime.built_images().await {
            Ok(images) => {
                for image in images.iter().filter(|image| image.slug.as_ref() == Some(slug)) {
                    if let Err(err) = self.runtime.remove_built(image, &images).await {
                        tracing::warn!(%slug, image = %image.id, error = %err, "cannot remove a built image");
                    }
                }
            }
            Err(err) => tracing::warn!(%slug, error = %err, "cannot list built images"),
        }
        self.prune(Vec::new());
    }

    /// The disk previewd's images take and the engine's free disk, read at most every 30 s.
    pub async fn disk(&self) -> Option<DiskUsage> {
        let cached = *self.disk.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, disk)) = cached
            && at.elapsed() < DISK_READING_TTL
        {
            return Some(disk);
        }
        let disk = self.runtime.disk().await.ok()?;
        *self.disk.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), disk));
        Some(disk)
    }
}

const LEFTOVER_EXTENSION: &str = "leftover";

/// The preview and step image a `.leftover` file names (see `Builds::leftover_path`).
fn read_leftover(path: &Path) -> Option<(Slug, String)> {
    if path.extension()? != LEFTOVER_EXTENSION {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    let slug = Slug::parse(name.split('.').next()?).ok()?;
    let id = std::fs::read_to_string(path).ok()?.trim().to_owned();
    let image_id = id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    image_id.then_some((slug, id))
}

/// What identifies a build besides the files outside `build.paths`.
fn reuse_key(build: &BuildSpec, paths_digest: &str) -> String {
    format!("{}-{paths_digest}", build.digest())
}

fn push_line(log: &mut Vec<String>, line: String) {
    if log.len() >= MAX_LOG_LINES {
        log.remove(0);
    }
    log.push(line);
}

/// A network leased for one build; removed when dropped.
struct BuildNetwork {
    name: String,
    networks: Networks,
}

impl Drop for BuildNetwork {
    fn drop(&mut self) {
        let (networks, name) = (self.networks.clone(), std::mem::take(&mut self.name));
        tokio::spawn(async move { networks.remove_once_free(&name).await });
    }
}

struct PreparedContext {
    file: tempfile::TempPath,
    summary: context::ContextSummary,
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ContextError> + Send + 'static,
) -> Result<T, BuildFailure> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| BuildFailure::Io(format!("the preparation stopped: {err}")))?
        .map_err(BuildFailure::Context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BuiltImage;

    #[test]
    fn image_tags_are_valid_docker_references() {
        let instance = InstanceName::parse("default").unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(image_tag(&instance, "Acme/Hello_World", sha), "previewd-default/acme/hello_world:0123456789ab");
        assert_eq!(image_tag(&instance, "acme/.github", sha), "previewd-default/acme/github:0123456789ab");
        assert_eq!(image_tag(&instance, "upload/feature-x", "ab"), "previewd-default/upload/feature-x:ab");
    }

    fn image(id: &str, tag: &str) -> BuiltImage {
        BuiltImage { id: id.into(), tags: vec![tag.into()], slug: None, created: 0, cache: None, added_bytes: 0 }
    }

    #[test]
    fn keep_removes_the_oldest_images_but_never_one_in_use() {
        let images = [image("c", "t:3"), image("b", "t:2"), image("a", "t:1")];
        assert_eq!(beyond_keep(&images, 2, &[]), vec!["a"]);
        assert_eq!(beyond_keep(&images, 1, &["t:1".to_owned()]), vec!["b"]);
        assert!(beyond_keep(&images, 3, &[]).is_empty());
    }
}
