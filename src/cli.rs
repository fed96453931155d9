//! The command line: `serve`, `check-config` and `hash-password`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{Application, shutdown_signal};
use crate::config::Config;
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
    /// Read a password from stdin and print its argon2id hash for `users` in config.yml.
    HashPassword,
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
        Command::HashPassword => hash_password(),
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
    VhostTemplate::load(&config.nginx.template).map_err(|err| format!("{}: nginx.template: {err}\n", path.display()))?;
    Ok(config)
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
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
