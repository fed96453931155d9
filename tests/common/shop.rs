//! The shop environment of the tests and drills: `previewd-shop:demo` with a PostgreSQL seeded
//! from `shop-db-seed` (10,000 products), a Redis and a migration job, all built by
//! scripts/setup.sh; and variants of it that fail in one place each.

use std::process::Command;

const IMAGES: &[&str] = &["previewd-shop:demo", "previewd-postgres:15", "previewd-redis:7"];
const SEED: &str = "shop-db-seed";

/// Without the images and the seed these tests cannot mean anything.
pub fn require_images() {
    for image in IMAGES {
        let found = Command::new("docker").args(["image", "inspect", image]).output().expect("docker").status.success();
        assert!(found, "{image} is missing: run scripts/setup.sh first");
    }
    let seed = Command::new("docker").args(["volume", "inspect", SEED]).output().expect("docker").status.success();
    assert!(seed, "the volume {SEED} is missing: run scripts/setup.sh first");
}

const DB: &str = r#"
      db:
        image: previewd-postgres:15
        pull: never
        env: {POSTGRES_USER: app, POSTGRES_PASSWORD: app, POSTGRES_DB: app}
        ready: {command: [pg_isready, -h, 127.0.0.1, -U, app, -d, app]}
        ready_timeout: 60
        data: /var/lib/postgresql/data
        seed_volume: shop-db-seed
        cap_add: [SETUID, SETGID]
        memory: 512m"#;
const CACHE: &str = r#"
      cache:
        image: previewd-redis:7
        pull: never
        ready: {tcp: 6379}"#;
/// Exits at once, with a line on stderr.
const BROKEN_CACHE: &str = r#"
      cache:
        image: previewd-redis:7
        pull: never
        command: [sh, -c, "echo cache config is broken >&2; exit 4"]
        ready: {tcp: 6379}"#;
/// Runs, but its ready check asks a port nothing listens on.
const DEAF_CACHE: &str = r#"
      cache:
        image: previewd-redis:7
        pull: never
        ready: {tcp: 6390}
        ready_timeout: 2"#;

fn shop_image(key: &str, services: &str) -> String {
    format!(
        r#"
  {key}:
    image: previewd-shop:demo
    port: 5000
    health_path: /healthz
    health_timeout: 30
    pull: never
    read_only: true
    env:
      DATABASE_URL: "postgres://app:app@db:5432/app"
      REDIS_URL: "redis://cache:6379/0"
      API_URL: "http://api-{{{{ slug }}}}.{{{{ base_domain }}}}"
    services:{services}
    jobs:
      - name: migrate
        command: [python3, migrate.py]
        timeout: 60"#
    )
}

/// The `images` entries `shop`, `shop-brokencache` and `shop-deafcache`, to go under `images:`.
pub fn images_yaml() -> String {
    [
        shop_image("shop", &format!("{DB}{CACHE}")),
        shop_image("shop-brokencache", &format!("{DB}{BROKEN_CACHE}")),
        shop_image("shop-deafcache", &format!("{DB}{DEAF_CACHE}")),
    ]
    .concat()
}
