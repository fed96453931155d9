//! The nginx router: the one owner of this instance's vhost files and of nginx reloads.
//!
//! Callers send the routes they want changed; a single worker applies every request waiting at
//! that moment as one batch: back up the affected files, write them atomically, `nginx -t`, and
//! reload once. If the test fails, the batch is restored and each request is retried on its own,
//! so one bad change fails alone and nginx keeps serving what it served.
//!
//! Launches announce themselves with a [`RouteTicket`] when they start. When a batch opens while
//! other launches are still on their way (containers starting, health checks running), the worker
//! waits for them, up to [`MAX_BATCH_WAIT`], so a burst of launches shares a few reloads. A lone
//! launch waits for nobody.

pub mod process;
pub mod reach;
pub mod sites;
pub mod vhost;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::preview::{BaseDomain, InstanceName, Slug};
use crate::traffic::Traffic;
pub use process::{Drain, Nginx, NginxError};
use sites::SitesDir;
use vhost::{Vhost, VhostTemplate};

/// After the first request of a batch arrives, how long to wait for others sent at the same time.
const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// The longest a route waits for launches still on their way to join its batch.
pub const MAX_BATCH_WAIT: Duration = Duration::from_secs(1);

/// The desired vhost of one preview: `Some(content)` to route it, `None` to remove it.
type Change = (Slug, Option<String>);

struct Job {
    changes: Vec<Change>,
    reply: oneshot::Sender<Result<Drain, NginxError>>,
}

/// Renders vhosts and routes every change through the single worker.
#[derive(Clone)]
pub struct Router {
    jobs: mpsc::UnboundedSender<Job>,
    inner: Arc<Inner>,
}

struct Inner {
    template: VhostTemplate,
    instance: InstanceName,
    base_domain: BaseDomain,
    listen: SocketAddr,
    sites: SitesDir,
    nginx: Nginx,
    traffic: Option<Traffic>,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    /// Launches that hold a ticket and have not sent their route yet.
    expected: AtomicUsize,
    expected_changed: Notify,
}

pub struct RouterSettings {
    pub template: VhostTemplate,
    pub instance: InstanceName,
    pub base_domain: BaseDomain,
    pub listen: SocketAddr,
    pub sites: SitesDir,
    pub nginx: Nginx,
    /// Where vhosts log requests to, when previewd follows traffic.
    pub traffic: Option<Traffic>,
}

impl Router {
    /// Starts the worker; it stops when the last `Router` clone is dropped.
    pub fn start(settings: RouterSettings) -> Self {
        let inner = Arc::new(Inner {
            template: settings.template,
            instance: settings.instance,
            base_domain: settings.base_domain,
            listen: settings.listen,
            sites: settings.sites,
            nginx: settings.nginx,
            traffic: settings.traffic,
            reloads: AtomicU64::new(0),
            failed_reloads: AtomicU64::new(0),
            expected: AtomicUsize::new(0),
            expected_changed: Notify::new(),
        });
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(worker(Arc::clone(&inner), queue));
        Self { jobs, inner }
    }

    pub fn nginx(&self) -> &Nginx {
        &self.inner.nginx
    }

    pub fn sites(&self) -> &SitesDir {
        &self.inner.sites
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    pub fn failed_reloads(&self) -> u64 {
        self.inner.failed_reloads.load(Ordering::Relaxed)
    }

    /// Announces a launch that will route a preview soon, so that routes sent meanwhile wait
    /// for it (briefly) and share its reload.
    pub fn ticket(&self) -> RouteTicket {
        self.inner.expected.fetch_add(1, Ordering::SeqCst);
        RouteTicket { router: self.clone(), open: true }
    }

    /// Routes `<slug>.<base_domain>` to `upstream`; returns once nginx serves it, with the
    /// workers still finishing requests under the old route.
    pub async fn route(&self, slug: &Slug, upstream: SocketAddr) -> Result<Drain, NginxError> {
        let content = self.inner.render(slug, upstream)?;
        self.submit(vec![(slug.clone(), Some(content))]).await
    }

    /// Routes a preview like `route`, unless its vhost already says exactly that.
    pub async fn route_if_changed(&self, slug: &Slug, upstream: SocketAddr) -> Result<bool, NginxError> {
        let content = self.inner.render(slug, upstream)?;
        let current = self.inner.sites.read(slug).map_err(|err| self.inner.io_error(err))?;
        if current.as_deref() == Some(content.as_str()) {
            return Ok(false);
        }
        self.submit(vec![(slug.clone(), Some(content))]).await.map(|_| true)
    }

    /// Proves that nginx serves the preview's host from its vhost, routed to `upstream`: a
    /// probe through nginx itself (see [`reach`]). When it does not, the error says why.
    pub async fn check_served(&self, slug: &Slug, upstream: SocketAddr) -> Result<(), NginxError> {
        let vhost = self.inner.render(slug, upstream)?;
        let host = self.inner.base_domain.host_for(slug).to_string();
        let addr = reach::connect_addr(self.inner.listen);
        let answer = reach::probe(addr, &host, reach::listens_tls(&vhost)).await;
        if answer.reached(&upstream.to_string()) {
            return Ok(());
        }
        let dump = self.inner.nginx.dump().await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot read nginx's configuration to say why the route is not served");
            String::new()
        });
        let file = self.inner.sites.path_for(slug);
        let why = reach::diagnose(&dump, self.inner.sites.dir(), &file, self.inner.listen, &answer);
        tracing::warn!(%slug, ?answer, "nginx does not serve the new route");
        Err(NginxError::NotServed(why))
    }

    /// The vhost of a preview as it is now, to put back with [`Router::restore`].
    pub fn current(&self, slug: &Slug) -> Result<Option<String>, NginxError> {
        self.inner.sites.read(slug).map_err(|err| self.inner.io_error(err))
    }

    /// Puts back a vhost read with [`Router::current`] (`None`: no route).
    pub async fn restore(&self, slug: &Slug, vhost: Option<String>) -> Result<(), NginxError> {
        self.submit(vec![(slug.clone(), vhost)]).await.map(drop)
    }

    /// Removes the route of a preview; returns once nginx no longer serves it.
    pub async fn unroute(&self, slug: &Slug) -> Result<(), NginxError> {
        self.submit(vec![(slug.clone(), None)]).await.map(drop)
    }

    /// Makes the sites dir hold exactly these routes (re-rendered), deleting every other vhost
    /// and temp file of this instance, with one reload. Each preview is its own change, so one
    /// that nginx rejects fails alone.
    pub async fn sync(&self, routes: &BTreeMap<Slug, SocketAddr>) -> Result<SyncOutcome, NginxError> {
        let inner = Arc::clone(&self.inner);
        let existing = tokio::task::spawn_blocking(move || {
            inner.sites.remove_temp_files()?;
            inner.sites.slugs()
        })
        .await
        .map_err(|err| NginxError::Io { path: self.inner.sites.dir().to_owned(), message: err.to_string() })?
        .map_err(|err| self.inner.io_error(err))?;
        let mut failures = Vec::new();
        let mut changes: Vec<Change> =
            existing.into_iter().filter(|slug| !routes.contains_key(slug)).map(|slug| (slug, None)).collect();
        let orphans = changes.len();
        for (slug, upstream) in routes {
            match self.inner.render(slug, *upstream) {
                Ok(content) => changes.push((slug.clone(), Some(content))),
                Err(err) => failures.push((slug.clone(), err)),
            }
        }
        let answers: Vec<_> = changes.into_iter().map(|change| (change.0.clone(), self.send(vec![change]))).collect();
        for (slug, answer) in answers {
            if let Err(err) = Self::receive(answer?).await {
                failures.push((slug, err));
            }
        }
        Ok(SyncOutcome { orphans, failures })
    }

    async fn submit(&self, changes: Vec<Change>) -> Result<Drain, NginxError> {
        Self::receive(self.send(changes)?).await
    }

    fn send(&self, changes: Vec<Change>) -> Result<oneshot::Receiver<Result<Drain, NginxError>>, NginxError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { changes, reply }).map_err(|_| NginxError::Stopped)?;
        Ok(answer)
    }

    async fn receive(answer: oneshot::Receiver<Result<Drain, NginxError>>) -> Result<Drain, NginxError> {
        answer.await.map_err(|_| NginxError::Stopped)?
    }
}

/// What a [`Router::sync`] did.
pub struct SyncOutcome {
    /// Vhosts of this instance that matched no route, deleted.
    pub orphans: usize,
    /// Routes nginx rejected (or that did not render), with the reason.
    pub failures: Vec<(Slug, NginxError)>,
}

/// A launch on its way to a route; see [`Router::ticket`]. Dropping it unused (a failed launch)
/// tells the worker not to wait for it.
pub struct RouteTicket {
    router: Router,
    open: bool,
}

impl RouteTicket {
    pub async fn route(mut self, slug: &Slug, upstream: SocketAddr) -> Result<Drain, NginxError> {
        self.close();
        self.router.route(slug, upstream).await
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            self.router.inner.expected.fetch_sub(1, Ordering::SeqCst);
            self.router.inner.expected_changed.notify_one();
        }
    }
}

impl Drop for RouteTicket {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn render(&self, slug: &Slug, upstream: SocketAddr) -> Result<String, NginxError> {
        let host = self.base_domain.host_for(slug);
        let mut vhost = Vhost::new(&self.instance, slug, &host, self.listen, upstream);
        if let Some(traffic) = &self.traffic {
            vhost.traffic = traffic.directive(slug);
        }
        self.template.render(&vhost).map_err(NginxError::Template)
    }

    fn io_error(&self, err: std::io::Error) -> NginxError {
        NginxError::Io { path: self.sites.dir().to_owned(), message: err.to_string() }
    }

    /// Writes the changes, remembering in `backups` what each file held before.
    fn apply(&self, changes: &[Change], backups: &mut Backups) -> Result<(), NginxError> {
        for (slug, content) in changes {
            if !backups.contains_key(slug) {
                let previous = self.sites.read(slug).map_err(|err| self.io_error(err))?;
                backups.insert(slug.clone(), previous);
            }
            self.sites.set(slug, content.as_deref()).map_err(|err| self.io_error(err))?;
        }
        Ok(())
    }

    fn restore(&self, backups: Backups) {
        for (slug, previous) in backups {
            if let Err(err) = self.sites.set(&slug, previous.as_deref()) {
                tracing::error!(%slug, error = %err, "cannot restore a vhost file");
            }
        }
    }

    /// Applies and tests a set of changes. On success returns what the files held before; on
    /// failure the files are as they were.
    async fn try_apply(self: &Arc<Self>, changes: Vec<Change>) -> Result<Backups, NginxError> {
        let inner = Arc::clone(self);
        // File writes fsync: keep them off the async workers.
        let (backups, written) = tokio::task::spawn_blocking(move || {
            let mut backups = Backups::new();
            let written = inner.apply(&changes, &mut backups);
            (backups, written)
        })
        .await
        .map_err(|err| NginxError::Io { path: self.sites.dir().to_owned(), message: err.to_string() })?;
        let result = match written {
            Ok(()) => self.nginx.test().await,
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => Ok(backups),
            Err(err) => {
                self.restore_off_runtime(backups).await;
                Err(match err {
                    NginxError::TestFailed(message) => NginxError::RolledBack(message),
                    other => other,
                })
            }
        }
    }

    async fn restore_off_runtime(self: &Arc<Self>, backups: Backups) {
        let inner = Arc::clone(self);
        if let Err(err) = tokio::task::spawn_blocking(move || inner.restore(backups)).await {
            tracing::error!(error = %err, "restoring vhost files failed");
        }
    }

    async fn reload(&self) -> Result<Drain, NginxError> {
        let result = self.nginx.reload().await;
        let counter = if result.is_ok() { &self.reloads } else { &self.failed_reloads };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

/// What the files of a batch held before it: `None` for a file that did not exist.
type Backups = BTreeMap<Slug, Option<String>>;

async fn worker(inner: Arc<Inner>, mut queue: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = queue.recv().await {
        let batch = gather(&inner, &mut queue, first).await;
        run_batch(&inner, batch).await;
    }
}

/// Collects the jobs sent with `first`, and those of launches still expected, up to the cap.
async fn gather(inner: &Inner, queue: &mut mpsc::UnboundedReceiver<Job>, first: Job) -> Vec<Job> {
    let deadline = Instant::now() + MAX_BATCH_WAIT;
    tokio::time::sleep(BATCH_WINDOW).await;
    let mut batch = vec![first];
    loop {
        while let Ok(job) = queue.try_recv() {
            batch.push(job);
        }
        if inner.expected.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
            return batch;
        }
        tokio::select! {
            Some(job) = queue.recv() => batch.push(job),
            () = inner.expected_changed.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn run_batch(inner: &Arc<Inner>, batch: Vec<Job>) {
    let all: Vec<Change> = batch.iter().flat_map(|job| job.changes.iter().cloned()).collect();
    let touched: BTreeSet<&Slug> = all.iter().map(|(slug, _)| slug).collect();
    tracing::debug!(jobs = batch.len(), previews = touched.len(), "applying vhost changes");
    let (accepted, backups) = match inner.try_apply(all).await {
        Ok(backups) => (batch, backups),
        Err(err) if batch.len() == 1 => {
            reply_all(batch, &Err(err));
            return;
        }
        Err(_) => one_by_one(inner, batch).await,
    };
    if accepted.is_empty() {
        return;
    }
    let result = inner.reload().await;
    if let Err(err) = &result {
        // Put the files back to what nginx still serves, so disk and nginx agree again.
        tracing::error!(error = %err, "nginx reload failed; restoring the previous vhost files");
        inner.restore_off_runtime(backups).await;
        if let Err(err) = inner.reload().await {
            tracing::error!(error = %err, "reload after restoring the vhost files failed too");
        }
    }
    reply_all(accepted, &result);
}

/// After a batch failed `nginx -t`: each job on its own, so only the bad ones fail.
async fn one_by_one(inner: &Arc<Inner>, batch: Vec<Job>) -> (Vec<Job>, Backups) {
    let mut accepted = Vec::new();
    let mut backups = Backups::new();
    for job in batch {
        match inner.try_apply(job.changes.clone()).await {
            Ok(job_backups) => {
                // The first backup of a file is its state before the whole batch.
                for (slug, previous) in job_backups {
                    backups.entry(slug).or_insert(previous);
                }
                accepted.push(job);
            }
            Err(err) => {
                job.reply.send(Err(err)).ok();
            }
        }
    }
    (accepted, backups)
}

fn reply_all(jobs: Vec<Job>, result: &Result<Drain, NginxError>) {
    for job in jobs {
        job.reply.send(result.clone()).ok();
    }
}
