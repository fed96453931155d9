//! The repository stands alone: a user's clone has nothing beside it, so no tracked file may read
//! from outside the checkout, and what the tests read is in the repository with its licence.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tracked_files() -> Vec<PathBuf> {
    let output = Command::new("git").arg("-C").arg(root()).args(["ls-files", "-z"]).output().expect("git runs");
    assert!(output.status.success(), "git ls-files failed: {}", String::from_utf8_lossy(&output.stderr));
    output
        .stdout
        .split(|byte| *byte == 0)
        .filter(|name| !name.is_empty())
        .map(|name| root().join(String::from_utf8_lossy(name).as_ref()))
        .collect()
}

#[test]
fn no_tracked_file_reads_from_outside_the_checkout() {
    let files = tracked_files();
    assert!(files.iter().any(|file| file.ends_with("src/github/event.rs")), "git ls-files listed the sources");
    let needle = ["..", "shared"].join("/");
    let offenders: Vec<_> = files
        .iter()
        .filter(|file| {
            std::fs::read(file).map(|bytes| String::from_utf8_lossy(&bytes).contains(&needle)).unwrap_or(false)
        })
        .collect();
    assert!(offenders.is_empty(), "these files refer to {needle}: {offenders:?}");
}

#[test]
fn the_webhook_fixtures_the_tests_read_are_in_the_repository_with_their_licence() {
    let dir = root().join("tests/fixtures/github-webhooks");
    for name in ["LICENSE", "ping.json", "push.json", "pull_request.opened.json", "pull_request.closed.json"] {
        assert!(dir.join(name).is_file(), "{} is missing", dir.join(name).display());
    }
    let licence = std::fs::read_to_string(dir.join("LICENSE")).expect("licence readable");
    assert!(licence.contains("MIT") || licence.contains("Permission is hereby granted"), "{licence}");
}
