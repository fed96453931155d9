//! Which launches may go ahead: a new preview only while `limits.max_previews` (in all) and
//! `limits.max_previews_per_user` (per owner) leave room, counting what runs and the new previews
//! still starting; and at most `limits.parallel_launches` launches at once, the rest queued.
//!
//! The decision ([`check`]) is pure; [`Admission`] feeds it the containers Docker lists and the
//! launches in flight, under one lock, so that two launches cannot both take the last place.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::preview::Slug;
use crate::request::Owner;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error(
        "limits.max_previews ({limit}) is reached: {limit} previews exist on this host; kill one (POST /kill) or raise limits.max_previews in config.yml"
    )]
    Previews { limit: usize },
    #[error(
        "limits.max_previews_per_user ({limit}) is reached: {owner} has {limit} previews; kill one of them (POST /kill) or ask an operator to raise limits.max_previews_per_user"
    )]
    PreviewsPerUser { limit: usize, owner: Owner },
}

/// Whether a launch of `name` for `owner` fits the limits, given the previews that exist (with
/// their owners) and the new ones still starting. A launch over an existing name replaces it
/// and always fits.
pub fn check(
    limits: &Limits,
    existing: &HashMap<Slug, Option<Owner>>,
    starting: &HashMap<Slug, Option<Owner>>,
    name: &Slug,
    owner: Option<&Owner>,
) -> Result<(), LimitError> {
    if existing.contains_key(name) || starting.contains_key(name) {
        return Ok(());
    }
    let all: BTreeSet<&Slug> = existing.keys().chain(starting.keys()).collect();
    if all.len() >= limits.max_previews {
        return Err(LimitError::Previews { limit: limits.max_previews });
    }
    if let Some(owner) = owner {
        let owned = existing
            .iter()
            .chain(starting.iter())
            .filter(|(_, of)| of.as_ref() == Some(owner))
            .map(|(slug, _)| slug)
            .collect::<BTreeSet<_>>();
        if owned.len() >= limits.max_previews_per_user {
            return Err(LimitError::PreviewsPerUser { limit: limits.max_previews_per_user, owner: owner.clone() });
        }
    }
    Ok(())
}

#[derive(Clone)]
pub struct Admission {
    limits: Limits,
    /// New previews admitted whose launch has not ended yet.
    starting: Arc<Mutex<HashMap<Slug, Option<Owner>>>>,
    /// Held from listing what exists until the new preview counts as starting.
    deciding: Arc<tokio::sync::Mutex<()>>,
    launches: Arc<Semaphore>,
}

/// A new preview's place, held until its launch ends (then its container counts, or it failed).
pub struct Place {
    slug: Option<Slug>,
    admission: Admission,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            starting: Arc::default(),
            deciding: Arc::default(),
            launches: Arc::new(Semaphore::new(limits.parallel_launches)),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `list` (what exists, by preview, with owners) and decides under one lock; a new
    /// preview then holds a [`Place`] until its launch ends. Returns `list`'s result too.
    pub async fn admit<T, E>(
        &self,
        name: &Slug,
        owner: Option<&Owner>,
        list: impl Future<Output = Result<(T, HashMap<Slug, Option<Owner>>), E>>,
    ) -> Result<(T, Place), AdmitError<E>> {
        let _deciding = self.deciding.lock().await;
        let (listed, existing) = list.await.map_err(AdmitError::List)?;
        let mut starting = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        check(&self.limits, &existing, &starting, name, owner).map_err(AdmitError::Limit)?;
        let is_new = !existing.contains_key(name) && !starting.contains_key(name);
        if is_new {
            starting.insert(name.clone(), owner.cloned());
        }
        Ok((listed, Place { slug: is_new.then(|| name.clone()), admission: self.clone() }))
    }

    /// A turn among the `parallel_launches`; `None` when all are taken (then wait with
    /// [`Admission::wait_turn`]).
    pub fn try_turn(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.launches).try_acquire_owned().ok()
    }

    pub async fn wait_turn(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.launches).acquire_owned().await.ok()
    }
}

impl Place {
    /// Gives the place back once the launch ended, under the deciding lock: a launch deciding
    /// meanwhile has listed either this preview's container or its place, never neither.
    pub async fn release(mut self) {
        if let Some(slug) = self.slug.take() {
            let _deciding = self.admission.deciding.lock().await;
            self.admission.starting.lock().unwrap_or_else(PoisonError::into_inner).remove(&slug);
        }
    }
}

impl Drop for Place {
    /// A launch that panicked or was dropped still gives its place back.
    fn drop(&mut self) {
        if let Some(slug) = self.slug.take() {
            self.admission.starting.lock().unwrap_or_else(PoisonError::into_inner).remove(&slug);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError<E> {
    #[error(transparent)]
    List(E),
    #[error(transparent)]
    Limit(LimitError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(name: &str) -> Slug {
        Slug::parse(name).unwrap()
    }

    fn limits(max_previews: usize, per_user: usize) -> Limits {
        Limits { max_previews, max_previews_per_user: per_user, ..Limits::default() }
    }

    fn owned(entries: &[(&str, Option<&str>)]) -> HashMap<Slug, Option<Owner>> {
        entries.iter().map(|(name, user)| (slug(name), user.map(|u| Owner::User(u.to_owned())))).collect()
    }

    #[test]
    fn a_new_preview_beyond_max_previews_is_refused_counting_those_still_starting() {
        let existing = owned(&[("a", None)]);
        let starting = owned(&[("b", None)]);
        let refused = check(&limits(2, 20), &existing, &starting, &slug("c"), None);
        assert_eq!(refused, Err(LimitError::Previews { limit: 2 }));
        assert_eq!(check(&limits(3, 20), &existing, &starting, &slug("c"), None), Ok(()));
    }

    #[test]
    fn replacing_an_existing_or_starting_preview_always_fits() {
        let existing = owned(&[("a", Some("ann"))]);
        let starting = owned(&[("b", Some("ann"))]);
        let ann = Owner::User("ann".into());
        assert_eq!(check(&limits(1, 1), &existing, &starting, &slug("a"), Some(&ann)), Ok(()));
        assert_eq!(check(&limits(1, 1), &existing, &starting, &slug("b"), Some(&ann)), Ok(()));
    }

    #[test]
    fn the_per_user_limit_counts_only_that_owners_previews() {
        let existing = owned(&[("a", Some("ann")), ("b", Some("bob")), ("c", None)]);
        let ann = Owner::User("ann".into());
        let bob = Owner::User("bob".into());
        let refused = check(&limits(100, 1), &existing, &HashMap::new(), &slug("d"), Some(&ann));
        assert_eq!(refused, Err(LimitError::PreviewsPerUser { limit: 1, owner: ann.clone() }));
        let carol = Owner::User("carol".into());
        assert_eq!(check(&limits(100, 1), &existing, &HashMap::new(), &slug("d"), Some(&carol)), Ok(()));
        assert!(check(&limits(100, 2), &existing, &HashMap::new(), &slug("d"), Some(&bob)).is_ok());
    }

    #[tokio::test]
    async fn a_place_is_held_until_released_so_the_last_place_goes_once() {
        let admission = Admission::new(limits(1, 20));
        let empty = || async { Ok::<_, ()>(((), HashMap::new())) };
        let (_, place) = admission.admit(&slug("a"), None, empty()).await.unwrap();
        let second = admission.admit(&slug("b"), None, empty()).await;
        assert!(matches!(second, Err(AdmitError::Limit(LimitError::Previews { limit: 1 }))));
        place.release().await;
        assert!(admission.admit(&slug("b"), None, empty()).await.is_ok());
    }
}
