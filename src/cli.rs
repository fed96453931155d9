//! The command line: the daemon (`serve`), its tools (`check-config`, `doctor`, `hash-password`), and the
//! client of a running daemon (`launch`, `kill`, `list`, `logs`, `login`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{Application, shutdown_signal};
use crate::client::{self, Client, ClientError, ClientFile, write_client_file};
use crate::config::Config;
use crate::doctor::Level;
use crate::nginx::vhost::VhostTemplate;

#[derive(Debug, Parser)]
#[command(name = "previewd", version, about = "A live preview per pull request on one Docker host")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, env = "PREVIEWD_CONFIG", default_value = "config.yml")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config file (and its vhost template): exit 0, or list every problem.
    CheckConfig {
        #[arg(long, env = "PREVIEWD_CONFIG", default_value = "config.yml")]
        config: PathBuf,
    },
    /// Check the deployment end to end (config, Docker, images, nginx, DNS, GitHub, ports): one
    /// line per check, exit 0 only when none fails.
    Doctor {
        #[arg(long, env = "PREVIEWD_CONFIG", default_value = "config.yml")]
        config: PathBuf,
    },
    /// Read a password from stdin and print its argon2id hash for `users` in config.yml.
    HashPassword,
    /// Launch (or replace) a preview, showing each step as the daemon takes it.
    Launch {
        /// A key of `images` in the daemon's config.yml.
        image: String,
        /// The preview's name (slugged to a DNS label).
        name: String,
        /// An environment variable for the container; repeatable. Not with --build.
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Build the image first from DIR, as `docker build DIR` would: DIR's Dockerfile, DIR
        /// sent as the build context minus what its .dockerignore excludes. The build's steps
        /// show with the launch's. A build takes no -e.
        #[arg(long, value_name = "DIR")]
        build: Option<PathBuf>,
        /// Open the preview in a browser once it is ready.
        #[arg(long)]
        open: bool,
        /// Print the preview as JSON instead of its URL, and no progress.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a preview.
    Kill {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the previews: name, image, PR, commit, status, services, age, URL; then the builds
    /// in flight and queued, with the Dockerfile step each runs.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Put a preview's data back as at its first launch: its services' data volumes made again
    /// from their seeds (or empty), every job run, the app restarted.
    Reset {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Put a preview to sleep: its app and services stopped (data kept) until a request, or
    /// `previewd wake`, wakes it.
    Sleep {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Wake a sleeping preview (services, then the app); returns once it answers.
    Wake {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Pin a preview awake: never put to sleep by idleness, caps or quiet hours, nor removed by
    /// age, until unpinned.
    Pin {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Unpin a preview: it sleeps and expires as any other again.
    Unpin {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Print a preview's log (its app's, a service's with --service, its last build's with
    /// --build).
    Logs {
        name: String,
        /// A service of the preview (`images.<key>.services`), e.g. db.
        #[arg(long, conflicts_with = "build")]
        service: Option<String>,
        /// The log of the preview's build in flight, or of its last build.
        #[arg(long)]
        build: bool,
        /// Keep printing what the container writes.
        #[arg(short, long)]
        follow: bool,
        #[arg(long, default_value_t = 100)]
        tail: usize,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Save the server and credentials (read from stdin) to ~/.config/previewd/client.yml (mode 0600).
    Login {
        /// A `users` name; the password is read from stdin.
        #[arg(long, conflicts_with = "github")]
        user: Option<String>,
        /// Log in with a GitHub token read from stdin (the daemon needs github.api_auth).
        #[arg(long)]
        github: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServerArg {
    /// The daemon's API address (default: the client file's, else http://127.0.0.1:7800).
    #[arg(long, env = "PREVIEWD_SERVER")]
    pub server: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, log_format } => {
            init_tracing(log_format);
            serve(&config)
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Doctor { config } => doctor(&config),
        Command::HashPassword => hash_password(),
        Command::Launch { build: Some(_), env, .. } if !env.is_empty() => {
            eprintln!("previewd: -e cannot be used with --build: a build launch takes no environment");
            ExitCode::from(2)
        }
        Command::Launch { image, name, env, build, open, json, server } => {
            client_command(server, |client| launch(client, image, name, env, build, open, json))
        }
        Command::Kill { name, server } => client_command(server, |client| async move {
            client.kill(&name).await?;
            println!("removed {name}");
            Ok(())
        }),
        Command::List { json, server } => client_command(server, |client| async move {
            let previews = client.list().await?;
            let builds = client.builds().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&previews).unwrap_or_default());
            } else {
                print!("{}", client::table(&previews));
                let building = client::builds_table(&builds);
                if !building.is_empty() {
                    print!("\nBUILDS\n{building}");
                }
            }
            Ok(())
        }),
        Command::Reset { name, server } => client_command(server, |client| async move {
            let preview = client.reset(&name).await?;
            println!("reset {name}: {}", preview["url"].as_str().unwrap_or_default());
            Ok(())
        }),
        Command::Sleep { name, server } => client_command(server, |client| async move {
            client.preview_action(&name, "sleep").await?;
            println!("{name} is asleep; a request to it, or `previewd wake {name}`, wakes it");
            Ok(())
        }),
        Command::Wake { name, server } => client_command(server, |client| async move {
            let preview = client.preview_action(&name, "wake").await?;
            println!("{name} is awake: {}", preview["url"].as_str().unwrap_or_default());
            Ok(())
        }),
        Command::Pin { name, server } => client_command(server, |client| async move {
            client.preview_action(&name, "pin").await?;
            println!("{name} is pinned: it is never put to sleep or removed by age until `previewd unpin {name}`");
            Ok(())
        }),
        Command::Unpin { name, server } => client_command(server, |client| async move {
            client.preview_action(&name, "unpin").await?;
            println!("{name} is unpinned");
            Ok(())
        }),
        Command::Logs { name, build: true, server, .. } => client_command(server, |client| async move {
            print!("{}", client.build_log(&name).await?);
            Ok(())
        }),
        Command::Logs { name, service, follow, tail, server, .. } => client_command(server, |client| async move {
            client.logs(&name, service.as_deref(), tail, follow, &mut std::io::stdout()).await
        }),
        Command::Login { user, github, server } => login(server.server, user, github),
    }
}

/// Runs a client command; its error goes to stderr with a non-zero exit code.
fn client_command<F, Fut>(server: ServerArg, command: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let result = Client::from_environment(server.server).and_then(|client| block_on(command(client)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("previewd: {err}");
            ExitCode::from(match err {
                ClientError::NoCredentials
                | ClientError::Usage(_)
                | ClientError::File { .. }
                | ClientError::Context(_) => 2,
                _ => 1,
            })
        }
    }
}

fn block_on<T>(future: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| ClientError::Usage(format!("cannot start the async runtime: {err}")))?
        .block_on(future)
}

/// `previewd launch`, with `--build DIR` a build of DIR first.
async fn launch(
    client: Client,
    image: String,
    name: String,
    env: Vec<String>,
    build: Option<PathBuf>,
    open: bool,
    json: bool,
) -> Result<(), ClientError> {
    let env = env
        .iter()
        .map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ClientError::Usage("-e takes KEY=VALUE".to_owned()))?;
    let started = std::time::Instant::now();
    let on_step = |event: &serde_json::Value| {
        if !json {
            let seconds = event["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
            eprintln!(
                "{:>6.1}s  {:<8} {}",
                seconds,
                event["step"].as_str().unwrap_or(""),
                event["message"].as_str().unwrap_or("")
            );
        }
    };
    let preview = match build {
        Some(dir) => client.build_launch(&image, &name, &dir, on_step).await?,
        None => client.launch(&image, &name, &env, on_step).await?,
    };
    let url = preview["url"].as_str().unwrap_or_default().to_owned();
    if json {
        println!("{}", serde_json::to_string_pretty(&preview).unwrap_or_default());
    } else {
        eprintln!("{:>6.1}s  {:<8} {url}", started.elapsed().as_secs_f64(), "ready");
        println!("{url}");
    }
    if open && std::process::Command::new("xdg-open").arg(&url).status().is_err() {
        eprintln!("previewd: cannot open a browser (no xdg-open); the URL is {url}");
    }
    Ok(())
}

fn login(server: Option<String>, user: Option<String>, github: bool) -> ExitCode {
    if user.is_none() && !github {
        eprintln!("previewd: give --user NAME (password on stdin) or --github (token on stdin)");
        return ExitCode::from(2);
    }
    let mut secret = String::new();
    if std::io::stdin().read_to_string(&mut secret).is_err() || secret.trim().is_empty() {
        eprintln!("previewd: no {} on stdin", if github { "token" } else { "password" });
        return ExitCode::from(2);
    }
    let secret = secret.trim_end_matches(['\n', '\r']).to_owned();
    let server = server.unwrap_or_else(|| "http://127.0.0.1:7800".to_owned());
    let client = Client::for_login(server.clone(), user.clone(), secret.clone());
    if let Err(err) = block_on(client.check()) {
        eprintln!("previewd: login failed: {err}");
        return ExitCode::FAILURE;
    }
    let file = match user {
        Some(user) => ClientFile { server: Some(server), user: Some(user), password: Some(secret), github_token: None },
        None => ClientFile { server: Some(server), github_token: Some(secret), ..ClientFile::default() },
    };
    match write_client_file(&file) {
        Ok(path) => {
            println!("logged in; saved {}", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("previewd: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(message) => {
            eprint!("{message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(config).await?;
        let token = app.shutdown_token();
        tokio::spawn(async move {
            shutdown_signal().await;
            token.cancel();
        });
        app.run_until_stopped().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("previewd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config and its template, or every problem as text for the terminal.
fn load(path: &Path) -> Result<Config, String> {
    let config = Config::load(path).map_err(|err| err.to_string())?;
    let template = VhostTemplate::load(&config.nginx.template, &config.trusted_proxies)
        .map_err(|err| format!("{}: nginx.template: {err}\n", path.display()))?;
    if config.lifecycle.follows_traffic() {
        template
            .check_traffic(&config.nginx.template)
            .map_err(|err| format!("{}: nginx.template: {err}\n", path.display()))?;
    }
    Ok(config)
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            for (line, _) in config.unsafe_settings() {
                eprintln!("{}: warning: {line}", path.display());
            }
            for line in seed_volume_warnings(&config) {
                eprintln!("{}: warning: {line}", path.display());
            }
            println!(
                "{}: OK (instance {}, {} image(s), {} user(s), previews at *.{})",
                path.display(),
                config.instance,
                config.images.len(),
                config.users.len(),
                config.base_domain
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprint!("{message}");
            ExitCode::from(2)
        }
    }
}

/// A warning per `seed_volume` Docker does not have (a launch of its image would fail), or one
/// saying they could not be checked; nothing when config.yml names none.
fn seed_volume_warnings(config: &Config) -> Vec<String> {
    let any_seed = config.images.values().flat_map(|spec| spec.services.values()).any(|s| s.seed_volume.is_some());
    if !any_seed {
        return Vec::new();
    }
    let checked = tokio::runtime::Runtime::new().map_err(|err| err.to_string()).and_then(|runtime| {
        runtime.block_on(crate::doctor::engine::missing_seed_volumes(config)).map_err(|err| err.to_string())
    });
    match checked {
        Ok(missing) => missing.iter().map(|(path, volume)| crate::doctor::engine::missing_seed(path, volume)).collect(),
        Err(err) => vec![format!("cannot check that the seed volumes exist: {err}")],
    }
}

fn doctor(path: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("previewd: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    let checks = runtime.block_on(crate::doctor::run(path));
    for check in &checks {
        println!("{check}");
    }
    let count = |level| checks.iter().filter(|check| check.level == level).count();
    let (ok, warn, fail) = (count(Level::Ok), count(Level::Warn), count(Level::Fail));
    println!("doctor: {ok} ok, {warn} warning(s), {fail} failed");
    if crate::doctor::worst(&checks) == Level::Fail { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read the password from stdin: {err}");
        return ExitCode::FAILURE;
    }
    let password = input.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(&input);
    if password.is_empty() {
        eprintln!("no password on stdin; try: echo -n 'secret' | previewd hash-password");
        return ExitCode::from(2);
    }
    match crate::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
