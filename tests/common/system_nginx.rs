//! An nginx started by hand, as a system nginx would be (not previewd's managed one).

/// An nginx started by hand; stopped on drop (by pid: its files may
/// already be gone with the temp dir).
pub struct SystemNginx {
    dir: std::path::PathBuf,
    args: Vec<String>,
    master: String,
}

impl SystemNginx {
    pub fn start(dir: &std::path::Path, port: u16) -> Self {
        Self::start_with(dir, port, true, true)
    }

    /// `includes_sites`: whether nginx.conf includes the sites dir; `long_names`: whether it
    /// sets a `server_names_hash_bucket_size` that holds previewd's longest host names.
    pub fn start_with(dir: &std::path::Path, port: u16, includes_sites: bool, long_names: bool) -> Self {
        let sites = dir.join("sites-enabled");
        std::fs::create_dir_all(&sites).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = dir.join("nginx.conf");
        let tmp = dir.join("tmp");
        std::fs::write(
            &conf,
            format!(
                "pid {pid};\nevents {{}}\nhttp {{\n  client_body_temp_path {tmp}/b;\n  proxy_temp_path {tmp}/p;\n  fastcgi_temp_path {tmp}/f;\n  uwsgi_temp_path {tmp}/u;\n  scgi_temp_path {tmp}/s;\n{bucket}  server {{ listen 127.0.0.1:{port} default_server; return 404; }}\n{include}}}\n",
                pid = dir.join("nginx.pid").display(),
                tmp = tmp.display(),
                bucket = if long_names { "  server_names_hash_bucket_size 256;\n" } else { "" },
                include = if includes_sites { format!("  include {}/*;\n", sites.display()) } else { String::new() },
            ),
        )
        .unwrap();
        let args = vec![
            "-p".into(),
            dir.display().to_string(),
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            dir.join("error.log").display().to_string(),
        ];
        let started = std::process::Command::new("nginx").args(&args).output().unwrap();
        assert!(started.status.success(), "{started:?}");
        let master = std::fs::read_to_string(dir.join("nginx.pid")).unwrap().trim().to_owned();
        Self { dir: dir.to_owned(), args, master }
    }

    pub fn sites_dir(&self) -> std::path::PathBuf {
        self.dir.join("sites-enabled")
    }

    /// The lines of config.yml's `nginx` section that make previewd drive this nginx, in place
    /// of `  managed: true`.
    pub fn unmanaged_yaml(&self) -> String {
        format!(
            "  managed: false\n  sites_dir: {sites}\n  pid_file: {pid}\n  test_command: {test}\n  reload_command: {reload}\n",
            sites = self.sites_dir().display(),
            pid = self.dir.join("nginx.pid").display(),
            test = self.yaml_list(&["nginx", "-t"]),
            reload = self.yaml_list(&["nginx", "-s", "reload"]),
        )
    }

    pub fn yaml_list(&self, head: &[&str]) -> String {
        let items: Vec<String> =
            head.iter().map(|s| s.to_string()).chain(self.args.iter().cloned()).map(|s| format!("\"{s}\"")).collect();
        format!("[{}]", items.join(", "))
    }
}

impl Drop for SystemNginx {
    fn drop(&mut self) {
        std::process::Command::new("kill").args(["-QUIT", &self.master]).output().ok();
    }
}
