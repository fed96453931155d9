//! Property tests of everything that parses untrusted input or renders it for nginx: no input
//! panics, and no name ever yields an nginx config that fails `nginx -t` or routes a host
//! outside `*.<base_domain>`.

mod common;

use std::path::Path;

use previewd::config::Config;
use previewd::nginx::vhost::{Vhost, VhostTemplate};
use previewd::preview::{BaseDomain, InstanceName, Slug};
use previewd::request::{KillRequest, LaunchRequest};
use proptest::prelude::*;

fn template() -> VhostTemplate {
    VhostTemplate::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera"), &[]).unwrap()
}

fn config() -> Config {
    let dir = tempfile::tempdir().unwrap();
    Config::from_yaml(&common::config_yaml("fuzz", dir.path(), 8080, &common::Options::default()), dir.path()).unwrap()
}

/// Text that stresses a slugger: any Unicode, and the characters nginx's syntax gives meaning.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-zA-Z0-9 ;{}\"'$#\\\\/\\n\\t.*~^-]{0,80}", "\\PC{0,200}"]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_name_slugs_to_a_dns_label_or_is_refused(text in hostile_text()) {
        if let Ok(slug) = Slug::slugify(&text) {
            let label = slug.as_ref();
            prop_assert!((1..=63).contains(&label.len()));
            prop_assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!label.starts_with('-') && !label.ends_with('-'));
            prop_assert_eq!(Slug::parse(label), Ok(slug.clone()));
        }
    }

    #[test]
    fn a_rendered_vhost_serves_exactly_one_host_under_the_base_domain(text in hostile_text(), port in 1u16..) {
        let Ok(slug) = Slug::slugify(&text) else { return Ok(()) };
        let domain = BaseDomain::parse("preview.localhost").unwrap();
        let host = domain.host_for(&slug);
        let instance = InstanceName::parse("fuzz").unwrap();
        let vhost = Vhost::new(&instance, &slug, &host, ([127, 0, 0, 1], 8080).into(), ([127, 0, 0, 1], port).into());
        let conf = template().render(&vhost).unwrap();
        let names: Vec<&str> = conf.lines().filter_map(|l| l.trim().strip_prefix("server_name ")).collect();
        prop_assert_eq!(names.len(), 1);
        let name = names[0].trim_end_matches(';');
        prop_assert!(name.ends_with(".preview.localhost") && !name.contains(char::is_whitespace), "{}", name);
        prop_assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn launch_and_kill_fields_never_panic(fields in proptest::collection::vec((hostile_text(), hostile_text()), 0..8)) {
        let images = config().images;
        if let Ok(request) = LaunchRequest::parse(fields.clone(), &images) {
            prop_assert!(images.contains_key(&request.image));
            prop_assert!(request.env.values().all(|v| !v.contains('\0')));
        }
        let _ = KillRequest::parse(fields);
    }

    #[test]
    fn config_text_never_panics(text in prop_oneof![any::<String>(), "[a-z_:\\n {}\\[\\],\"-]{0,300}"]) {
        let dir = tempfile::tempdir().unwrap();
        let _ = Config::from_yaml(&text, dir.path());
    }

    #[test]
    fn webhook_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = serde_json::from_slice::<previewd::github::event::PullRequestEvent>(&bytes);
    }
}

/// Many names at once, through the real `nginx -t`: every rendered vhost is valid nginx.
#[test]
fn nginx_accepts_the_vhosts_of_hostile_names() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let dir = tempfile::tempdir().unwrap();
    let sites = dir.path().join("sites");
    std::fs::create_dir_all(&sites).unwrap();
    let mut runner = TestRunner::deterministic();
    let domain = BaseDomain::parse("preview.localhost").unwrap();
    let instance = InstanceName::parse("fuzz").unwrap();
    let template = template();
    let mut written = 0;
    for round in 0..3000 {
        let text = hostile_text().new_tree(&mut runner).unwrap().current();
        let Ok(slug) = Slug::slugify(&text) else { continue };
        let host = domain.host_for(&slug);
        let vhost = Vhost::new(
            &instance,
            &slug,
            &host,
            ([127, 0, 0, 1], 8080).into(),
            ([127, 0, 0, 1], 1024 + round % 60000).into(),
        );
        std::fs::write(sites.join(format!("{slug}.conf")), template.render(&vhost).unwrap()).unwrap();
        written += 1;
    }
    assert!(written > 500, "only {written} names slugged");
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {pid};\nevents {{}}\nhttp {{\n  server_names_hash_bucket_size 256;\n  server_names_hash_max_size 8192;\n  include {sites}/*.conf;\n}}\n",
            pid = dir.path().join("nginx.pid").display(),
            sites = sites.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new("nginx")
        .args(["-t", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .output()
        .expect("nginx is installed by scripts/setup.sh");
    assert!(
        output.status.success(),
        "nginx -t failed on {written} vhosts: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
