//! The command line: `serve`, the client commands (`upload`, `list`, `token`) and the offline tools
//! (`export`, `import`, `check-config`, `print-config`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::ServeOptions;

/// fwrepo: firmware repository and OTA rollout server for DJI-Cloud-API-style gateways.
#[derive(Parser, Debug)]
#[command(name = "fwrepo", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (zero configuration: ./storage, HTTP 127.0.0.1:8080).
    Serve(ServeOptions),
    /// Upload a firmware package to a running server, with a progress bar; prints the record.
    Upload(UploadArgs),
    /// List firmware on a running server.
    List(ListArgs),
    /// Create, list and revoke API tokens on a running server (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the embedded broker's MQTT password of each gateway serial (`--mqtt-auth on`;
    /// reads <data-dir>/mqtt-credentials.key, works while the server runs).
    MqttPassword(MqttPasswordArgs),
    /// Write the catalog, every record kind, as JSON lines (a sled catalog's server must be
    /// stopped).
    Export(ExportArgs),
    /// Read a catalog export into a catalog, e.g. sled into PostgreSQL (a sled catalog's
    /// server must be stopped).
    Import(ImportArgs),
    /// Run the PostgreSQL catalog's migrations and exit (`fwrepo serve` also runs them).
    Migrate(MigrateArgs),
    /// Simulate docks and aircraft that answer ota_create, download and report progress.
    Simulate(crate::simulator::SimConfig),
    /// Validate the configuration and exit.
    CheckConfig(ServeOptions),
    /// Print the effective configuration (secrets redacted).
    PrintConfig(ServeOptions),
}

/// Where the server is and how to authenticate.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Server base URL.
    #[arg(long, env = "FWREPO_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token (sent as Authorization: Bearer). Without one, a local server's
    /// <data-dir>/admin.token is used.
    #[arg(long, env = "FWREPO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory of a local server, whose admin.token is the fallback token.
    #[arg(long = "data-dir", env = "FWREPO_DATA_DIR", default_value = "storage")]
    pub data_dir: PathBuf,
}

/// `fwrepo token …`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (shown only this once).
    Create(TokenCreateArgs),
    /// List tokens (never the tokens themselves).
    List(TokenListArgs),
    /// Revoke a token by id.
    Revoke(TokenRevokeArgs),
}

/// `fwrepo token create`.
#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    /// Server and token.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Who or what holds the token.
    #[arg(long)]
    pub name: String,
    /// Scopes: read, upload, operate, admin (comma-separated or repeated).
    #[arg(long = "scope", value_delimiter = ',', required = true)]
    pub scopes: Vec<String>,
    /// Expiry in days from now (default: never).
    #[arg(long)]
    pub expires_in_days: Option<u32>,
    /// Print the whole record as JSON instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

/// `fwrepo token list`.
#[derive(Args, Debug)]
pub struct TokenListArgs {
    /// Server and token.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `fwrepo token revoke`.
#[derive(Args, Debug)]
pub struct TokenRevokeArgs {
    /// Server and token.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Id of the token to revoke.
    pub id: String,
}

/// `fwrepo upload`.
#[derive(Args, Debug)]
pub struct UploadArgs {
    /// The package file.
    pub file: PathBuf,
    /// Server and token.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Model (else parsed from the file name).
    #[arg(long)]
    pub model: Option<String>,
    /// Version (else parsed from the file name).
    #[arg(long)]
    pub product_version: Option<String>,
    /// Expected MD5; the server refuses the upload if the bytes differ.
    #[arg(long)]
    pub md5: Option<String>,
    /// Expected SHA-256; the server refuses the upload if the bytes differ.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Release note.
    #[arg(long)]
    pub release_note: Option<String>,
    /// File name to store (default: the file's own name).
    #[arg(long)]
    pub file_name: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `fwrepo list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Server and token.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only this version.
    #[arg(long)]
    pub product_version: Option<String>,
    /// Only this status (ready, corrupt, disabled, deleted).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many records (all pages are fetched up to it).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `fwrepo mqtt-password`.
#[derive(Args, Debug)]
pub struct MqttPasswordArgs {
    /// Data directory of the server.
    #[arg(long, env = "FWREPO_DATA_DIR", default_value = "storage")]
    pub data_dir: PathBuf,
    /// Gateway serials (each is the client id and the user name).
    #[arg(required = true)]
    pub sn: Vec<String>,
}

/// `fwrepo export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Data directory of the stopped server.
    #[arg(long, env = "FWREPO_DATA_DIR", default_value = "storage")]
    pub data_dir: PathBuf,
    /// Catalog: sled (in the data directory) or a postgres:// URL [default: sled].
    #[arg(long, env = "FWREPO_CATALOG")]
    pub catalog: Option<String>,
    /// Output file (default: stdout).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// `fwrepo migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The postgres:// URL of the catalog.
    #[arg(long, env = "FWREPO_CATALOG")]
    pub catalog: String,
}

/// `fwrepo import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Data directory of the stopped server.
    #[arg(long, env = "FWREPO_DATA_DIR", default_value = "storage")]
    pub data_dir: PathBuf,
    /// Catalog: sled (in the data directory) or a postgres:// URL [default: sled].
    #[arg(long, env = "FWREPO_CATALOG")]
    pub catalog: Option<String>,
    /// Input file (default: stdin).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
}
