//! Pins: a pinned preview is never put to sleep by idleness, caps or quiet hours, nor removed by
//! age (`lifecycle.remove_after`); it can still be put to sleep by hand. A preview is pinned by
//! hand (`POST /api/previews/{name}/pin`, `previewd pin`, the dashboard, `/preview pin`) or by
//! its pull request's `lifecycle.keep_awake_label`, which pins it while the label is on.
//! Pins are kept in `<state_dir>/pinned.json` and go with the preview.

use serde::{Deserialize, Serialize};

use super::{Lifecycle, LifecycleError};
use crate::preview::Slug;

/// Who pinned a preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinnedBy {
    /// The pull request carries `lifecycle.keep_awake_label`.
    Label(String),
    /// Someone: `user:<name>`, `github:<login>`.
    Person(String),
}

impl std::fmt::Display for PinnedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(label) => write!(f, "label {label}"),
            Self::Person(who) => f.write_str(who),
        }
    }
}

/// A pin, as `pinned.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Unix seconds.
    pub since: i64,
    pub by: PinnedBy,
}

impl Lifecycle {
    /// Pins a preview that exists (a pin already there is kept, with its author).
    pub async fn pin(&self, slug: &Slug, by: PinnedBy) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        self.get(slug).await?;
        if !self.is_pinned(slug) {
            self.pins.set(slug, Some(Pin { since: crate::clock::unix_now(), by }))?;
            tracing::info!(%slug, "preview pinned");
        }
        self.count_pins();
        Ok(())
    }

    /// Unpins a preview (nothing if it was not pinned).
    pub async fn unpin(&self, slug: &Slug) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        self.get(slug).await?;
        if self.is_pinned(slug) {
            self.pins.set(slug, None)?;
            tracing::info!(%slug, "preview unpinned");
        }
        self.count_pins();
        Ok(())
    }

    /// Pins the preview of a pull request that carries `label`, and unpins it when the label is
    /// gone (a pin by hand stays).
    pub async fn follow_label(&self, slug: &Slug, label: &str, labelled: bool) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        if labelled && self.get(slug).await.is_err() {
            // Removed meanwhile: nothing to pin.
            return Ok(());
        }
        match (self.pins.get(slug), labelled) {
            (None, true) => {
                let by = PinnedBy::Label(label.to_owned());
                self.pins.set(slug, Some(Pin { since: crate::clock::unix_now(), by }))?;
            }
            (Some(Pin { by: PinnedBy::Label(_), .. }), false) => self.pins.set(slug, None)?,
            _ => {}
        }
        self.count_pins();
        Ok(())
    }

    pub fn pinned(&self, slug: &Slug) -> Option<Pin> {
        self.pins.get(slug)
    }

    pub fn is_pinned(&self, slug: &Slug) -> bool {
        self.pins.contains(slug)
    }

    /// Forgets the pins of previews that have no container left (removed while previewd was
    /// down, or by hand).
    pub(super) fn forget_gone_pins(&self, previews: &std::collections::BTreeSet<Slug>) -> Result<(), LifecycleError> {
        self.pins.retain(|slug, _| previews.contains(slug))?;
        self.count_pins();
        Ok(())
    }

    pub(super) fn count_pins(&self) {
        self.metrics.previews_pinned.set(self.pins.all().len() as i64);
    }
}
