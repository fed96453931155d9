//! The build routes: `POST /api/builds` (a build context uploaded as a tar, built and launched
//! with the same progress as a launch), `GET /api/builds` (builds in flight and queued) and
//! `GET /api/previews/{name}/build-log` (a preview's last build log).

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::body::declared_length;
use super::error::ApiError;
use super::{AppState, NDJSON, accepts, launch_streaming, run_tracked, wants_json};
use crate::auth::Principal;
use crate::build::context::Layout;
use crate::build::{BuildInput, BuildStatus, SourceArchive};
use crate::config::builds::{RawBuild, validate_build};
use crate::lifecycle::{LifecycleError, PreviewInfo};
use crate::request::{LaunchRequest, Owner, preview_name};

/// `POST /api/builds?image=KEY&name=NAME` with the context as an `application/x-tar` body.
pub async fn post_build(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let mut request = parse_query(query.as_deref(), &state)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if content_type.split(';').next().unwrap_or_default().trim() != "application/x-tar" {
        return Err(ApiError::NotATar(content_type.to_owned()));
    }
    state.authorize(&principal, Some(&request.image)).await?;
    state.may_launch(&principal, &request.name).await?;
    request.owner = Some(match &principal {
        Principal::User(name) => Owner::User(name.clone()),
        Principal::GitHub(login) => Owner::GitHub(login.clone()),
    });
    let limit = state.config.builds.max_context;
    declared_length(&headers, usize::try_from(limit).unwrap_or(usize::MAX))?;
    let builds = state.lifecycle.builds();
    let temp_dir = builds.temp_dir().map_err(|err| ApiError::Internal(format!("cannot keep the upload: {err}")))?;
    let (file, digest) = upload(body, &temp_dir, limit, state.config.http.body_timeout).await?;
    let build = validate_build("build", RawBuild::default(), None, &mut |_, _| {})
        .ok_or_else(|| ApiError::Internal("the default build does not validate".into()))?;
    let input = BuildInput {
        source: SourceArchive { file, layout: Layout::Plain },
        build,
        claim: builds.claim(&request.name, &digest),
        repository: format!("upload/{}", request.name),
        revision: digest,
        repo_file: true,
    };
    if accepts(&headers, NDJSON) {
        return Ok(launch_streaming(&state, request, Some(input)));
    }
    let lifecycle = state.lifecycle.clone();
    let info = run_tracked(&state, async move { lifecycle.launch_built(request, Some(input), None).await }).await?;
    Ok(if wants_json(&headers) { Json(info).into_response() } else { format!("{}\n", info.url).into_response() })
}

/// `image` and `name` from the query, as a launch's `image_name` and `container_name`.
fn parse_query(query: Option<&str>, state: &AppState) -> Result<LaunchRequest, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|err| ApiError::Body(format!("cannot read the query: {err}")))?;
    let mut fields = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "image" => fields.push(("image_name".to_owned(), value)),
            "name" => fields.push(("container_name".to_owned(), value)),
            other => return Err(ApiError::Body(format!("unknown query parameter {other:?}: give image and name"))),
        }
    }
    Ok(LaunchRequest::parse(fields, &state.config.images)?)
}

/// Streams the body to a file, at most `limit` bytes, each piece within `idle` of the one
/// before; the file and the first 12 hex digits of its SHA-256.
async fn upload(
    body: Body,
    dir: &std::path::Path,
    limit: u64,
    idle: Duration,
) -> Result<(tempfile::TempPath, String), ApiError> {
    let io = |err: std::io::Error| ApiError::Internal(format!("cannot keep the upload: {err}"));
    let path = tempfile::NamedTempFile::new_in(dir).map_err(io)?.into_temp_path();
    let mut file = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await.map_err(io)?);
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(Err(err))) => return Err(ApiError::Body(format!("cannot read the request body: {err}"))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        received += chunk.len() as u64;
        if received > limit {
            return Err(ApiError::TooLarge(usize::try_from(limit).unwrap_or(usize::MAX)));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    if received == 0 {
        return Err(ApiError::Body("the body is empty: send the build context as a tar".into()));
    }
    Ok((path, hex::encode(&hasher.finalize()[..6])))
}

/// `GET /api/builds`: builds in flight and queued, oldest first. A token user sees the builds of
/// previews they may see (a first build, with no preview yet, only to operators).
pub async fn list_builds(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<BuildStatus>>, ApiError> {
    let statuses = state.lifecycle.builds().statuses();
    if matches!(principal, Principal::User(_)) {
        return Ok(Json(statuses));
    }
    Ok(Json(visible_builds(&principal, statuses, &state.visible_previews(&principal).await?)))
}

/// The builds `principal` may see, of those in flight: an operator all, a token user those of
/// the previews they may see (`visible`), so not a first build, which has no preview yet.
pub fn visible_builds(principal: &Principal, statuses: Vec<BuildStatus>, visible: &[PreviewInfo]) -> Vec<BuildStatus> {
    match principal {
        Principal::User(_) => statuses,
        Principal::GitHub(_) => {
            statuses.into_iter().filter(|status| visible.iter().any(|preview| preview.name == status.name)).collect()
        }
    }
}

/// `GET /api/previews/{name}/build-log`: the log of the preview's build in flight, or else of
/// its last build (also when that first build failed and no preview runs). A token user reads
/// only the logs of previews they may see, so not the log of a first build that failed.
pub async fn build_log(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let slug = preview_name("name", &name)?;
    if matches!(principal, Principal::GitHub(_)) {
        state.visible_preview(&principal, &name).await?;
    } else {
        state.authorize(&principal, None).await?;
    }
    let log = state.lifecycle.builds().log(&slug).ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
    // The output is the build's: never let a browser run it on this origin.
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        log,
    )
        .into_response())
}

/// The builds part of `/healthz`: disk used by previewd's images, Docker's free disk, builds
/// in flight.
pub async fn health(state: &AppState) -> Value {
    let builds = state.lifecycle.builds();
    let disk = builds.disk().await;
    json!({
        "in_flight": builds.statuses().len(),
        "images_bytes": disk.and_then(|d| d.images_bytes),
        "docker_free_bytes": disk.and_then(|d| d.free_bytes),
        "min_free_disk": builds.config().min_free_disk,
    })
}
