//! Test harness for Darkroom's integration and end-to-end tests.
//!
//! Every test gets its own real servers, started as child processes on free
//! local ports with their own temporary directories:
//!
//! - [`NatsServer`]: `nats-server` with JetStream (`-js -sd <tmp>/store`).
//! - [`S3Server`]: SeaweedFS `weed mini`, an S3 gateway that can post its
//!   filer events to a webhook (the way the local stack feeds the ingest
//!   function).
//!
//! The binaries are looked up in `$DARKROOM_NATS_SERVER_BIN` /
//! `$DARKROOM_WEED_BIN` (exported by `local-dev/env.sh`), then in
//! `<repo>/.venv/bin` (where `local-dev/install` puts them), then on `PATH`.
//!
//! Ports are drawn at random from pools below Linux's ephemeral range, checked
//! by binding them, and reserved for the life of the server so tests running
//! in parallel in one process never share a port. Another process can still
//! take a port between the check and the server's own bind; a start that fails
//! that way is retried on fresh ports.
//!
//! Servers are killed when dropped; their temporary directories go with them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub mod lambda_api;
pub mod stand_in;
pub mod webhook;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
pub use darkroom_nats_auth::{Role, UserKey};
use tempfile::TempDir;

/// Environment variable naming the `nats-server` binary.
pub const NATS_SERVER_BIN_ENV: &str = "DARKROOM_NATS_SERVER_BIN";
/// Environment variable naming the SeaweedFS `weed` binary.
pub const WEED_BIN_ENV: &str = "DARKROOM_WEED_BIN";

/// Access key [`S3Server`] gives SeaweedFS (its admin identity).
pub const S3_ACCESS_KEY: &str = "darkroom-test";
/// Secret key [`S3Server`] gives SeaweedFS.
pub const S3_SECRET_KEY: &str = "darkroom-test-secret";
/// Region the [`S3Server::client`] signs for.
pub const S3_REGION: &str = "us-east-1";

const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);
const S3_READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const START_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 40;
/// SeaweedFS derives each component's gRPC port as its HTTP port + 10000, and
/// some internal clients (the admin worker) assume that offset even when a
/// gRPC port is given explicitly, so the harness always keeps it.
const GRPC_PORT_OFFSET: u16 = 10_000;

/// The repository root (the parent of the `tests` crate).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Finds a server binary: `$env_var` if set, else `<repo>/.venv/bin/<name>`,
/// else `<name>` on `PATH`.
pub fn find_binary(env_var: &str, name: &str) -> Result<PathBuf> {
    resolve_binary(
        std::env::var_os(env_var),
        env_var,
        name,
        &repo_root().join(".venv").join("bin"),
        std::env::var_os("PATH"),
    )
}

fn resolve_binary(
    explicit: Option<OsString>,
    env_var: &str,
    name: &str,
    venv_bin: &Path,
    path: Option<OsString>,
) -> Result<PathBuf> {
    if let Some(explicit) = explicit.filter(|value| !value.is_empty()) {
        let explicit = PathBuf::from(explicit);
        if is_executable(&explicit) {
            return Ok(explicit);
        }
        bail!(
            "{env_var}={} is not an executable file (run local-dev/install, or unset {env_var})",
            explicit.display()
        );
    }
    let in_venv = venv_bin.join(name);
    if is_executable(&in_venv) {
        return Ok(in_venv);
    }
    if let Some(found) = path
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
    {
        return Ok(found);
    }
    bail!(
        "cannot find `{name}`: set {env_var}, run local-dev/install (it puts `{name}` in {}), \
         or put it on PATH",
        venv_bin.display()
    )
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Reserves a free local TCP port for the rest of this test process (it is
/// never handed out again by this harness). Use it for a listener a server
/// must know in advance, e.g. the webhook URL given to [`S3Server::start`];
/// a listener that can bind `127.0.0.1:0` itself needs no reservation.
pub fn reserve_port() -> Result<u16> {
    let mut lease = PortLease::take(Pool::Plain, 1)?;
    let port = lease.base[0];
    // Nothing to release on drop: the port stays reserved.
    lease.all.clear();
    Ok(port)
}

/// Where ports are drawn from. Both pools lie below Linux's default ephemeral
/// range (32768–60999), so outgoing connections do not take them, and away
/// from the local stack's default ports (14222, 18xxx, 19333 and +10000).
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// One port each.
    Plain,
    /// A port `p` with `p + 10000` also free, for SeaweedFS components.
    WithGrpc,
}

impl Pool {
    fn range(self) -> Range<u16> {
        match self {
            Pool::Plain => 22_800..28_000,
            Pool::WithGrpc => 20_000..22_768,
        }
    }

    fn ports_for(self, base: u16) -> Vec<u16> {
        match self {
            Pool::Plain => vec![base],
            Pool::WithGrpc => vec![base, base + GRPC_PORT_OFFSET],
        }
    }
}

/// Ports handed out by this process and not yet released.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn reserved() -> MutexGuard<'static, BTreeSet<u16>> {
    RESERVED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ports held by one server while it lives; released when dropped.
#[derive(Debug)]
struct PortLease {
    /// The ports asked for, in order.
    base: Vec<u16>,
    /// Those plus the derived gRPC ports.
    all: Vec<u16>,
}

impl PortLease {
    fn take(pool: Pool, count: usize) -> Result<Self> {
        let range = pool.range();
        let mut reserved = reserved();
        let mut listeners = Vec::new();
        let mut base = Vec::with_capacity(count);
        let mut all = Vec::new();
        let mut tries = 0;
        while base.len() < count {
            tries += 1;
            if tries > 5_000 {
                bail!("found no free local ports in {range:?} after {tries} tries");
            }
            let candidate = rand::random_range(range.clone());
            let ports = pool.ports_for(candidate);
            if ports
                .iter()
                .any(|port| reserved.contains(port) || all.contains(port))
            {
                continue;
            }
            // Keep them bound until every port is chosen, so the checks hold
            // for the whole set.
            let Ok(bound) = ports
                .iter()
                .map(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, *port)))
                .collect::<io::Result<Vec<_>>>()
            else {
                continue;
            };
            listeners.extend(bound);
            all.extend(ports);
            base.push(candidate);
        }
        reserved.extend(all.iter().copied());
        Ok(Self { base, all })
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        let mut reserved = reserved();
        for port in &self.all {
            reserved.remove(port);
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
struct Process {
    child: Child,
}

impl Process {
    fn has_exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    async fn terminate(mut self, grace: Duration) {
        if !matches!(self.has_exited(), Ok(None)) {
            return;
        }
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // The child is not reaped yet, so the pid is still ours.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.has_exited(), Ok(None)) {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        // Dropping kills what is left.
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How to run one server process and tell when it is ready.
#[derive(Debug)]
struct ProcessSpec {
    what: &'static str,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    env: Vec<(&'static str, &'static str)>,
    env_remove: Vec<&'static str>,
    log: PathBuf,
    /// The server is ready when every probe passes.
    probes: Vec<Probe>,
    timeout: Duration,
}

/// One readiness check: a GET and what its answer must look like.
#[derive(Debug)]
struct Probe {
    url: String,
    expect: Expect,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Status 200.
    Ok,
    /// Any HTTP answer at all.
    AnyStatus,
    /// A SeaweedFS master `/dir/status` listing at least one volume server.
    /// Until the volume server's first heartbeat the master cannot locate any
    /// volume, and reads through S3 fail with 500 even though S3 answers.
    WeedVolumeServer,
}

impl Probe {
    async fn passes(&self, client: &reqwest::Client) -> bool {
        let Ok(response) = client.get(&self.url).send().await else {
            return false;
        };
        match self.expect {
            Expect::AnyStatus => true,
            Expect::Ok => response.status() == reqwest::StatusCode::OK,
            Expect::WeedVolumeServer => response
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|status| weed_has_volume_server(&status)),
        }
    }
}

fn weed_has_volume_server(status: &serde_json::Value) -> bool {
    let list = |value: &serde_json::Value, key: &str| {
        value
            .get(key)
            .and_then(serde_json::Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    list(&status["Topology"], "DataCenters")
        .iter()
        .flat_map(|dc| list(dc, "Racks"))
        .any(|rack| !list(&rack, "DataNodes").is_empty())
}

/// Why a launch did not become ready.
#[derive(Debug)]
enum LaunchFailure {
    /// The server could not bind one of its ports: try other ports.
    PortClash(anyhow::Error),
    Other(anyhow::Error),
}

impl LaunchFailure {
    fn into_error(self) -> anyhow::Error {
        match self {
            LaunchFailure::PortClash(error) | LaunchFailure::Other(error) => error,
        }
    }
}

impl From<anyhow::Error> for LaunchFailure {
    fn from(error: anyhow::Error) -> Self {
        LaunchFailure::Other(error)
    }
}

async fn launch(spec: &ProcessSpec) -> Result<Process, LaunchFailure> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("cannot open {}", spec.log.display()))?;
    writeln!(
        log,
        "--- darkroom-tests: {} {}",
        spec.program.display(),
        spec.args.join(" ")
    )
    .with_context(|| format!("cannot write {}", spec.log.display()))?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot clone log file handle")?)
        .stderr(log);
    for (key, value) in &spec.env {
        command.env(key, value);
    }
    for key in &spec.env_remove {
        command.env_remove(key);
    }
    let mut process = Process {
        child: command
            .spawn()
            .with_context(|| format!("cannot start {}", spec.program.display()))?,
    };

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .context("cannot build an HTTP client")?;
    let started = Instant::now();
    loop {
        if let Some(status) = process
            .has_exited()
            .with_context(|| format!("cannot wait for {}", spec.what))?
        {
            let tail = log_tail(&spec.log);
            let error = anyhow!(
                "{} exited ({status}) before it was ready; last lines of {}:\n{tail}",
                spec.what,
                spec.log.display()
            );
            return Err(if looks_like_port_clash(&tail) {
                LaunchFailure::PortClash(error)
            } else {
                LaunchFailure::Other(error)
            });
        }
        if all_pass(&spec.probes, &client).await {
            return Ok(process);
        }
        if started.elapsed() >= spec.timeout {
            drop(process);
            return Err(LaunchFailure::Other(anyhow!(
                "{} was not ready after {:?} (polling {}); last lines of {}:\n{}",
                spec.what,
                spec.timeout,
                spec.probes
                    .iter()
                    .map(|probe| probe.url.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.log.display(),
                log_tail(&spec.log)
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn all_pass(probes: &[Probe], client: &reqwest::Client) -> bool {
    for probe in probes {
        if !probe.passes(client).await {
            return false;
        }
    }
    true
}

/// Launches on fresh ports until the server does not lose a port race.
async fn launch_on_free_ports(
    pool: Pool,
    count: usize,
    spec_for: impl Fn(&[u16]) -> ProcessSpec,
) -> Result<(Process, PortLease)> {
    let mut last = None;
    for _ in 0..START_ATTEMPTS {
        let ports = PortLease::take(pool, count)?;
        match launch(&spec_for(&ports.base)).await {
            Ok(process) => return Ok((process, ports)),
            Err(LaunchFailure::PortClash(error)) => last = Some(error),
            Err(LaunchFailure::Other(error)) => return Err(error),
        }
    }
    let error = last.unwrap_or_else(|| anyhow!("no start was attempted"));
    Err(error.context(format!(
        "the server lost a race for its ports {START_ATTEMPTS} times"
    )))
}

fn looks_like_port_clash(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use")
        || (log.contains("port") && log.contains("not available"))
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

fn temp_dir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("cannot create a temporary directory for {prefix}"))
}

/// A `nats-server` with JetStream, on free ports, storing in a temporary
/// directory. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    // Field order is drop order: the process dies before its ports are
    // released and its directory is removed.
    process: Option<Process>,
    ports: PortLease,
    binary: PathBuf,
    /// The config file (`-c`) of a server started with [`NatsServer::start_secured`].
    config: Option<PathBuf>,
    /// Every Darkroom user's NKey, on a secured server; the seeds are in `<dir>/secrets`.
    keys: BTreeMap<Role, UserKey>,
    /// The server's CA and certificates, on a server started with [`NatsServer::start_tls`].
    tls: Option<TestTls>,
    dir: TempDir,
}

/// How a TLS server of the harness treats clients without a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Clients authenticate with their NKey only (Darkroom's deployments).
    NotAsked,
    /// Clients must also present a certificate the test CA signed (`--tls-verify`).
    Required,
}

/// A TLS server's private CA and files: `<dir>/tls/{ca.crt,tls.crt,tls.key}`, and a client
/// certificate (`client.crt`, `client.key`) the harness's own clients present where the server
/// asks for one.
#[derive(Debug)]
struct TestTls {
    ca: darkroom_nats_auth::tls::CertificateAuthority,
    dir: PathBuf,
    client_certificates: ClientCertificates,
    client: (PathBuf, PathBuf),
}

impl TestTls {
    /// A CA valid for a day, a server certificate for `localhost` and `127.0.0.1`, and a
    /// client certificate, written under `dir`.
    fn generate(dir: &Path, client_certificates: ClientCertificates) -> Result<Self> {
        use darkroom_nats_auth::tls::CertificateAuthority;
        let ca =
            CertificateAuthority::generate("Darkroom test CA", Duration::from_secs(24 * 60 * 60))?;
        let server = ca.issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        ca.write_server_files(dir, &server)?;
        let mut tls = TestTls {
            ca,
            dir: dir.to_path_buf(),
            client_certificates,
            client: (PathBuf::new(), PathBuf::new()),
        };
        tls.client = tls.issue_client("client")?;
        Ok(tls)
    }

    fn issue_client(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let issued = self.ca.issue_client(name)?;
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        fs::write(&cert, &issued.certificate_pem)
            .with_context(|| format!("write {}", cert.display()))?;
        darkroom_nats_auth::tls::write_private(&key, &issued.private_key_pem)
            .with_context(|| format!("write {}", key.display()))?;
        Ok((cert, key))
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(darkroom_nats_auth::tls::CA_FILE)
    }

    fn server_settings(&self) -> darkroom_nats_auth::ServerTls {
        darkroom_nats_auth::ServerTls {
            cert_file: self.dir.join(darkroom_nats_auth::tls::CERT_FILE),
            key_file: self.dir.join(darkroom_nats_auth::tls::KEY_FILE),
            ca_file: Some(self.ca_file()),
            verify_clients: self.client_certificates == ClientCertificates::Required,
        }
    }

    /// What the harness's own clients use: the CA, and the client certificate where the
    /// server asks for one.
    fn client_settings(&self) -> darkroom_shared::nats_tls::NatsTls {
        darkroom_shared::nats_tls::NatsTls {
            required: true,
            ca_file: Some(self.ca_file()),
            client_certificate: (self.client_certificates == ClientCertificates::Required)
                .then(|| self.client.clone()),
        }
    }
}

impl NatsServer {
    /// Starts a server and waits (up to 10 s) until JetStream is ready.
    pub async fn start() -> Result<Self> {
        let binary = find_binary(NATS_SERVER_BIN_ENV, "nats-server")?;
        let dir = temp_dir("darkroom-nats-")?;
        let (process, ports) = launch_on_free_ports(Pool::Plain, 2, |ports| {
            nats_spec(&binary, dir.path(), None, ports[0], ports[1])
        })
        .await?;
        Ok(Self {
            process: Some(process),
            ports,
            binary,
            config: None,
            keys: BTreeMap::new(),
            tls: None,
            dir,
        })
    }

    /// Starts a server with Darkroom's authorisation (infra/nats): the `DARKROOM` account,
    /// one NKey user per [`Role`] with fresh seeds (files in a private folder, as
    /// `darkroom-nats-config render` writes them), anonymous connections refused. Connect with
    /// [`client_as`](Self::client_as) or give a function [`runtime_as`](Self::runtime_as).
    pub async fn start_secured() -> Result<Self> {
        Self::start_with_users(None).await
    }

    /// [`start_secured`](Self::start_secured), serving TLS only (`tls://` URLs): a fresh test
    /// CA signs the server's certificate (for `localhost` and `127.0.0.1`), rendered into the
    /// config by `darkroom-nats-config`'s `render` (infra/nats). [`client_as`](Self::client_as),
    /// [`runtime_as`](Self::runtime_as) and [`function_env`](Self::function_env) trust that
    /// CA, and present a client certificate it signed when `client_certificates` requires one.
    pub async fn start_tls(client_certificates: ClientCertificates) -> Result<Self> {
        Self::start_with_users(Some(client_certificates)).await
    }

    async fn start_with_users(tls: Option<ClientCertificates>) -> Result<Self> {
        let binary = find_binary(NATS_SERVER_BIN_ENV, "nats-server")?;
        let dir = temp_dir("darkroom-nats-")?;
        let keys = darkroom_nats_auth::secrets::load_or_create(&dir.path().join("secrets"))
            .context("generate the NATS users' seeds")?;
        let tls = tls
            .map(|client_certificates| {
                TestTls::generate(&dir.path().join("tls"), client_certificates)
            })
            .transpose()
            .context("generate the test CA and certificates")?;
        // Listen addresses and the store are given on the command line, which wins over the file.
        let config = dir.path().join("nats.conf");
        let text = darkroom_nats_auth::render(
            &darkroom_nats_auth::ServerSettings {
                tls: tls.as_ref().map(TestTls::server_settings),
                ..darkroom_nats_auth::ServerSettings::default()
            },
            &darkroom_nats_auth::secrets::public_keys(&keys),
        );
        fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let (process, ports) = launch_on_free_ports(Pool::Plain, 2, |ports| {
            nats_spec(&binary, dir.path(), Some(&config), ports[0], ports[1])
        })
        .await?;
        Ok(Self {
            process: Some(process),
            ports,
            binary,
            config: Some(config),
            keys,
            tls,
            dir,
        })
    }

    /// The test CA's certificate (`ca.crt`) of a server from [`start_tls`](Self::start_tls),
    /// for `DARKROOM_NATS_TLS_CA_FILE`.
    pub fn tls_ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(TestTls::ca_file)
    }

    /// A new client certificate for `name` from the test CA of a server from
    /// [`start_tls`](Self::start_tls): its certificate and key files (PEM).
    pub fn issue_client_certificate(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        self.tls
            .as_ref()
            .with_context(|| format!("{} serves no TLS", self.url()))?
            .issue_client(name)
    }

    /// `role`'s NKey on a server from [`start_secured`](Self::start_secured).
    ///
    /// # Panics
    /// On a server started without authorisation.
    pub fn user_key(&self, role: Role) -> &UserKey {
        self.keys
            .get(&role)
            .unwrap_or_else(|| panic!("{} started without authorisation", self.url()))
    }

    /// The private file (0600) holding `role`'s seed, for `DARKROOM_NATS_NKEY_FILE`.
    pub fn seed_file(&self, role: Role) -> PathBuf {
        darkroom_nats_auth::secrets::seed_path(&self.dir.path().join("secrets"), role)
    }

    /// The config file a secured server runs with.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// A client connected as `role` (see [`start_secured`](Self::start_secured)).
    pub async fn client_as(&self, role: Role) -> Result<async_nats::Client> {
        let mut options =
            async_nats::ConnectOptions::with_nkey(self.user_key(role).seed().to_owned());
        if let Some(tls) = &self.tls {
            options = tls.client_settings().apply(options);
        }
        options
            .connect(self.url())
            .await
            .with_context(|| format!("cannot connect to {} as {}", self.url(), role.user()))
    }

    /// The settings a Darkroom binary needs to reach this server as the client whose seed is
    /// `seed_file` (checking, not provisioning, the topology) and `s3`'s `bucket`.
    pub fn client_env(
        &self,
        s3: &S3Server,
        bucket: &str,
        seed_file: &Path,
    ) -> Vec<(&'static str, OsString)> {
        vec![
            ("DARKROOM_NATS_URL", self.url().into()),
            ("DARKROOM_NATS_NKEY_FILE", seed_file.into()),
            ("DARKROOM_JETSTREAM_PROVISION", "false".into()),
            ("DARKROOM_S3_ENDPOINT", s3.endpoint().into()),
            ("DARKROOM_S3_ACCESS_KEY_ID", s3.access_key().into()),
            ("DARKROOM_S3_SECRET_ACCESS_KEY", s3.secret_key().into()),
            ("DARKROOM_BUCKET", bucket.into()),
        ]
    }

    /// Preprocess (its own `serve`, as its binary runs it) as the `preprocess` user, against
    /// `s3`'s `bucket`, checking the topology rather than provisioning it. Stop it with the
    /// token; the task ends with its result.
    pub fn spawn_preprocess_as_its_user(
        &self,
        s3: &S3Server,
        bucket: &str,
    ) -> (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let config = darkroom_preprocess::config::PreprocessConfig {
            runtime: darkroom_shared::RuntimeConfig {
                s3_endpoint: Some(s3.endpoint()),
                s3_access_key_id: Some(s3.access_key().to_owned()),
                s3_secret_access_key: Some(s3.secret_key().to_owned()),
                bucket: bucket.to_owned(),
                jetstream_provision: false,
                ..self.runtime_as(Role::Preprocess)
            },
            ..darkroom_preprocess::config::PreprocessConfig::default()
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(darkroom_preprocess::service::serve(
            config,
            shutdown.clone(),
        ));
        (shutdown, task)
    }

    /// Announces `object` as the `ingest` user and waits (up to `timeout`) until the jobs
    /// stream holds a job, read as the `provisioner`: the stream's messages then.
    ///
    /// # Panics
    /// When a connection fails or no job arrives in time.
    pub async fn announce_and_wait_for_a_job(
        &self,
        object: &darkroom_events::ObjectRef,
        timeout: Duration,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        let connect = |role: Role| async move {
            async_nats::jetstream::new(
                self.client_as(role)
                    .await
                    .unwrap_or_else(|e| panic!("{e:#}")),
            )
        };
        announce_upload(&connect(Role::Ingest).await, object).await;
        let provisioner = connect(Role::Provisioner).await;
        wait_for(
            timeout,
            || stream_messages(&provisioner, darkroom_events::subjects::JOBS_STREAM),
            |jobs| !jobs.is_empty(),
        )
        .await
    }

    /// A function's runtime settings for this server, as `role`: its seed file in
    /// [`RuntimeConfig::nats_nkey_file`](darkroom_shared::RuntimeConfig::nats_nkey_file).
    pub fn runtime_as(&self, role: Role) -> darkroom_shared::RuntimeConfig {
        let tls = self
            .tls
            .as_ref()
            .map(TestTls::client_settings)
            .unwrap_or_default();
        let (nats_tls_cert_file, nats_tls_key_file) = tls.client_certificate.unzip();
        darkroom_shared::RuntimeConfig {
            nats_url: self.url(),
            nats_nkey_file: Some(self.seed_file(role)),
            nats_tls_ca_file: tls.ca_file,
            nats_tls_cert_file,
            nats_tls_key_file,
            ..darkroom_shared::RuntimeConfig::default()
        }
    }

    /// Client URL, `nats://127.0.0.1:<port>` (`tls://…` on a server from
    /// [`start_tls`](Self::start_tls)).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port())
    }

    /// Monitoring URL, `http://127.0.0.1:<port>` (`/healthz`, `/jsz`, …).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port())
    }

    /// A client connected to this server.
    pub async fn client(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("cannot connect to {}", self.url()))
    }

    /// A JetStream context on a new client connected to this server.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.client().await?))
    }

    /// The environment a Darkroom function needs to reach this server
    /// (`DARKROOM_NATS_URL`, and on a TLS server `DARKROOM_NATS_TLS_CA_FILE` and the client
    /// certificate where it asks for one), for `Command::envs`. The NKey seed is the caller's.
    pub fn function_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("DARKROOM_NATS_URL", self.url())];
        if let Some(tls) = &self.tls {
            let settings = tls.client_settings();
            if let Some(ca) = settings.ca_file {
                env.push(("DARKROOM_NATS_TLS_CA_FILE", ca.display().to_string()));
            }
            if let Some((cert, key)) = settings.client_certificate {
                env.push(("DARKROOM_NATS_TLS_CERT_FILE", cert.display().to_string()));
                env.push(("DARKROOM_NATS_TLS_KEY_FILE", key.display().to_string()));
            }
        }
        env
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.ports.base[0]
    }

    /// Monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.ports.base[1]
    }

    /// JetStream store directory (`-sd`); it survives restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Whether the process is alive (false after [`kill`](Self::kill) or
    /// [`stop`](Self::stop), or if it died).
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| matches!(process.has_exited(), Ok(None)))
    }

    /// Kills the server at once (SIGKILL), like a crash. The store is kept;
    /// [`restart`](Self::restart) brings it back.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Stops the server gracefully (SIGTERM, SIGKILL after 10 s).
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate(STOP_GRACE).await;
        }
    }

    /// Stops the server if it runs, then starts it again on the same ports
    /// with the same store, and waits until JetStream is ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let spec = nats_spec(
            &self.binary,
            self.dir.path(),
            self.config.as_deref(),
            self.port(),
            self.monitor_port(),
        );
        let process = launch(&spec)
            .await
            .map_err(|failure| failure.into_error().context("restarting nats-server"))?;
        self.process = Some(process);
        Ok(())
    }
}

fn nats_spec(
    binary: &Path,
    dir: &Path,
    config: Option<&Path>,
    port: u16,
    monitor_port: u16,
) -> ProcessSpec {
    let mut args: Vec<String> = Vec::new();
    if let Some(config) = config {
        args.extend(["-c".to_owned(), config.display().to_string()]);
    }
    ProcessSpec {
        what: "nats-server",
        program: binary.to_path_buf(),
        args: [
            args,
            vec![
                "-js".into(),
                "-sd".into(),
                dir.join("store").display().to_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-m".into(),
                monitor_port.to_string(),
            ],
        ]
        .concat(),
        cwd: dir.to_path_buf(),
        env: Vec::new(),
        env_remove: Vec::new(),
        log: dir.join("nats-server.log"),
        probes: vec![Probe {
            url: format!("http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"),
            expect: Expect::Ok,
        }],
        timeout: NATS_READY_TIMEOUT,
    }
}

/// Three (or more) `nats-server` processes clustered on loopback: routes between them,
/// JetStream on each with its own store and server name (`n1`, `n2`, …). Clients get every
/// node's URL ([`urls`](Self::urls)); a node can be killed and brought back by name.
#[derive(Debug)]
pub struct NatsCluster {
    // Field order is drop order (see `NatsServer`).
    nodes: Vec<ClusterNode>,
    ports: PortLease,
    binary: PathBuf,
    dir: TempDir,
}

#[derive(Debug)]
struct ClusterNode {
    name: String,
    process: Option<Process>,
}

/// The cluster's name in the servers' configuration.
const CLUSTER_NAME: &str = "darkroom-test";

impl NatsCluster {
    /// Starts `size` servers and waits until each has JetStream enabled. The JetStream meta
    /// leader may take a moment more: retry the first stream creation.
    pub async fn start(size: usize) -> Result<Self> {
        let binary = find_binary(NATS_SERVER_BIN_ENV, "nats-server")?;
        let dir = temp_dir("darkroom-nats-cluster-")?;
        // Client, monitoring and route port of every node, chosen together.
        let ports = PortLease::take(Pool::Plain, size * 3)?;
        let mut cluster = Self {
            nodes: (1..=size)
                .map(|n| ClusterNode {
                    name: format!("n{n}"),
                    process: None,
                })
                .collect(),
            ports,
            binary,
            dir,
        };
        let launches: Vec<ProcessSpec> = (0..size).map(|i| cluster.spec(i)).collect();
        // Start every node before waiting on any: a node's JetStream waits for its peers.
        let mut started = Vec::new();
        for spec in &launches {
            started.push(launch(spec));
        }
        let results = futures::future::join_all(started).await;
        for (node, result) in cluster.nodes.iter_mut().zip(results) {
            node.process = Some(result.map_err(LaunchFailure::into_error)?);
        }
        Ok(cluster)
    }

    fn spec(&self, index: usize) -> ProcessSpec {
        let name = &self.nodes[index].name;
        let node_dir = self.dir.path().join(name);
        let _ = fs::create_dir_all(&node_dir);
        let [client, monitor, route] = self.node_ports(index);
        let routes: Vec<String> = (0..self.nodes.len())
            .filter(|other| *other != index)
            .map(|other| format!("nats-route://127.0.0.1:{}", self.node_ports(other)[2]))
            .collect();
        ProcessSpec {
            what: "nats-server (cluster node)",
            program: self.binary.clone(),
            args: vec![
                "-js".into(),
                "-sd".into(),
                node_dir.join("store").display().to_string(),
                "-n".into(),
                name.clone(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                client.to_string(),
                "-m".into(),
                monitor.to_string(),
                "--cluster_name".into(),
                CLUSTER_NAME.into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".into(),
                routes.join(","),
            ],
            cwd: node_dir.clone(),
            env: Vec::new(),
            env_remove: Vec::new(),
            log: node_dir.join("nats-server.log"),
            probes: vec![Probe {
                url: format!("http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"),
                expect: Expect::Ok,
            }],
            timeout: NATS_READY_TIMEOUT,
        }
    }

    fn node_ports(&self, index: usize) -> [u16; 3] {
        let base = &self.ports.base;
        [base[index * 3], base[index * 3 + 1], base[index * 3 + 2]]
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .ok_or_else(|| anyhow!("no cluster node named {name}"))
    }

    /// Every node's client URL, comma-separated (what `DARKROOM_NATS_URL` takes).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| format!("nats://127.0.0.1:{}", self.node_ports(i)[0]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes' server names.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    /// A node's log.
    pub fn log_path(&self, name: &str) -> Result<PathBuf> {
        let index = self.index_of(name)?;
        Ok(self
            .dir
            .path()
            .join(&self.nodes[index].name)
            .join("nats-server.log"))
    }

    /// A client given every node's URL.
    pub async fn client(&self) -> Result<async_nats::Client> {
        let urls: Vec<String> = self.urls().split(',').map(str::to_owned).collect();
        async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(urls)
            .await
            .with_context(|| format!("cannot connect to {}", self.urls()))
    }

    /// Kills node `name` at once (SIGKILL), like a crash; its store is kept.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let index = self.index_of(name)?;
        self.nodes[index].process = None;
        Ok(())
    }

    /// Starts node `name` again on its ports with its store, and waits until JetStream is
    /// enabled on it.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        let index = self.index_of(name)?;
        if let Some(process) = self.nodes[index].process.take() {
            process.terminate(STOP_GRACE).await;
        }
        let process = launch(&self.spec(index))
            .await
            .map_err(|failure| failure.into_error().context(format!("restarting {name}")))?;
        self.nodes[index].process = Some(process);
        Ok(())
    }
}

/// A SeaweedFS `weed mini` S3 server on free ports, storing in a temporary
/// directory, optionally posting its filer events to a webhook. Killed when
/// dropped.
#[derive(Debug)]
pub struct S3Server {
    // Field order is drop order (see `NatsServer`).
    process: Option<Process>,
    /// s3, filer, master, volume, admin (each also +10000 for gRPC).
    ports: PortLease,
    binary: PathBuf,
    dir: TempDir,
    webhook: Option<String>,
}

impl S3Server {
    /// Starts a server and waits (up to 30 s) until its S3 port answers HTTP
    /// and its master knows the volume server (before that, reads of existing
    /// objects fail with 500).
    ///
    /// With `webhook`, SeaweedFS posts its own event JSON for every create and
    /// update under `/buckets/` to that URL (a `notification.toml` in its
    /// working directory). It drops an event whose POST fails, so start the
    /// listener first.
    pub async fn start(webhook: Option<&str>) -> Result<Self> {
        let binary = find_binary(WEED_BIN_ENV, "weed")?;
        let dir = temp_dir("darkroom-s3-")?;
        fs::create_dir_all(dir.path().join("data"))
            .context("cannot create the SeaweedFS data directory")?;
        fs::create_dir_all(dir.path().join("glog"))
            .context("cannot create the SeaweedFS log directory")?;
        if let Some(url) = webhook {
            let path = dir.path().join("notification.toml");
            fs::write(&path, notification_toml(url))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let (process, ports) =
            launch_on_free_ports(Pool::WithGrpc, WEED_COMPONENTS.len(), |ports| {
                weed_spec(&binary, dir.path(), ports)
            })
            .await?;
        Ok(Self {
            process: Some(process),
            ports,
            binary,
            dir,
            webhook: webhook.map(str::to_owned),
        })
    }

    /// S3 endpoint URL, `http://127.0.0.1:<port>` (path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    /// S3 port.
    pub fn s3_port(&self) -> u16 {
        self.ports.base[0]
    }

    /// Filer URL, `http://127.0.0.1:<port>`, for looking behind the S3 API.
    pub fn filer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.base[1])
    }

    /// Access key of the server's admin identity.
    pub fn access_key(&self) -> &'static str {
        S3_ACCESS_KEY
    }

    /// Secret key of the server's admin identity.
    pub fn secret_key(&self) -> &'static str {
        S3_SECRET_KEY
    }

    /// Region clients should sign for.
    pub fn region(&self) -> &'static str {
        S3_REGION
    }

    /// The webhook URL events are posted to, if any.
    pub fn webhook(&self) -> Option<&str> {
        self.webhook.as_deref()
    }

    /// Data directory (`-dir`); it survives restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's console log (stdout and stderr of every run, appended);
    /// SeaweedFS's detailed logs are in the `glog` directory beside it.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The environment a Darkroom function needs to reach this server
    /// (`DARKROOM_S3_ENDPOINT`, `DARKROOM_S3_REGION` and the AWS credential
    /// variables), for `Command::envs`. The bucket (`DARKROOM_BUCKET`) is the
    /// test's choice.
    pub fn function_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DARKROOM_S3_ENDPOINT", self.endpoint()),
            ("DARKROOM_S3_REGION", S3_REGION.to_owned()),
            ("AWS_REGION", S3_REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
        ]
    }

    /// An S3 client for this server: path style, region `us-east-1`, static
    /// credentials.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(S3_REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new(
                S3_ACCESS_KEY,
                S3_SECRET_KEY,
                None,
                None,
                "darkroom-tests",
            ))
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|process| matches!(process.has_exited(), Ok(None)))
    }

    /// Kills the server at once (SIGKILL), like a crash. The data is kept;
    /// [`restart`](Self::restart) brings it back.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Stops the server gracefully (SIGTERM, SIGKILL after 10 s; SeaweedFS
    /// takes about 3 s).
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate(STOP_GRACE).await;
        }
    }

    /// Stops the server if it runs, then starts it again on the same ports
    /// with the same data and webhook, and waits until S3 answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let spec = weed_spec(&self.binary, self.dir.path(), &self.ports.base);
        let process = launch(&spec)
            .await
            .map_err(|failure| failure.into_error().context("restarting SeaweedFS"))?;
        self.process = Some(process);
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Kill first, then remove the Unix sockets weed keeps in /tmp, named
        // after our ports (weed removes them itself only on a clean shutdown).
        self.process = None;
        for (component, port) in WEED_COMPONENTS.iter().zip(&self.ports.base) {
            let grpc = port + GRPC_PORT_OFFSET;
            for socket in [
                format!("/tmp/seaweedfs-{component}-{port}.sock"),
                format!("/tmp/seaweedfs-{component}-grpc-{grpc}.sock"),
            ] {
                let _ = fs::remove_file(socket);
            }
        }
    }
}

/// SeaweedFS components with a port of their own, in the order of
/// `S3Server::ports`.
const WEED_COMPONENTS: [&str; 5] = ["s3", "filer", "master", "volume", "admin"];

/// `weed mini` with every port set explicitly (HTTP ports from `ports`:
/// s3, filer, master, volume, admin; gRPC ports at +10000) and the extra
/// listeners it would open on fixed ports (Iceberg, Lance, WebDAV) turned off,
/// so that several servers can run side by side.
fn weed_spec(binary: &Path, dir: &Path, ports: &[u16]) -> ProcessSpec {
    let mut args = vec![
        format!("-logdir={}", dir.join("glog").display()),
        "mini".to_owned(),
        format!("-dir={}", dir.join("data").display()),
        "-ip=127.0.0.1".to_owned(),
        "-ip.bind=127.0.0.1".to_owned(),
    ];
    for (component, port) in WEED_COMPONENTS.iter().zip(ports) {
        args.push(format!("-{component}.port={port}"));
        args.push(format!(
            "-{component}.port.grpc={}",
            port + GRPC_PORT_OFFSET
        ));
    }
    args.extend(
        [
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        .map(str::to_owned),
    );
    ProcessSpec {
        what: "SeaweedFS (weed mini)",
        program: binary.to_path_buf(),
        args,
        cwd: dir.to_path_buf(),
        env: vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        ],
        env_remove: vec!["AWS_SESSION_TOKEN"],
        log: dir.join("weed.log"),
        probes: vec![
            Probe {
                url: format!("http://127.0.0.1:{}/", ports[0]),
                expect: Expect::AnyStatus,
            },
            Probe {
                url: format!("http://127.0.0.1:{}/dir/status", ports[2]),
                expect: Expect::WeedVolumeServer,
            },
        ],
        timeout: S3_READY_TIMEOUT,
    }
}

fn notification_toml(url: &str) -> String {
    let mut toml = String::from("[notification.webhook]\nenabled = true\n");
    let _ = writeln!(toml, "endpoint = {}", toml_string(url));
    toml.push_str("event_types = [\"create\", \"update\"]\n");
    toml.push_str("path_prefixes = [\"/buckets/\"]\n");
    toml
}

fn toml_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Runs preprocess on the shared consumer loop in this process (pulls expiring after 500 ms,
/// so it stops quickly), publishing on `js`; cancel the token to stop it.
///
/// # Panics
/// When the jobs KV bucket or the presets cannot be opened (the test's setup is wrong).
pub async fn spawn_preprocess(
    js: &async_nats::jetstream::Context,
    topology: &darkroom_shared::topology::Topology,
    config: darkroom_preprocess::config::PreprocessConfig,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    use darkroom_events::subjects;
    let presets = config.presets().unwrap_or_else(|e| panic!("presets: {e}"));
    let jobs = darkroom_shared::jobs::JobStore::open(js)
        .await
        .unwrap_or_else(|e| panic!("jobs KV: {e}"));
    let handler = std::sync::Arc::new(darkroom_preprocess::handler::PreprocessHandler::new(
        darkroom_shared::s3::client(&config.runtime).await,
        darkroom_shared::publish::Publisher::new(js.clone(), darkroom_preprocess::handler::SOURCE),
        jobs,
        presets,
        config,
    ));
    let publisher = handler.publisher().clone();
    let mut settings = darkroom_shared::consumer::ConsumerSettings::new(
        topology,
        subjects::UPLOADS_STREAM,
        subjects::consumers::PREPROCESS,
    );
    settings.fetch_expires = Duration::from_millis(500);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(error) =
                darkroom_shared::consumer::run(handler, publisher, settings, shutdown).await
            {
                panic!("preprocess stopped: {error}");
            }
        }
    });
    (shutdown, task)
}

/// nats-server, and SeaweedFS whose filer announces every upload to an ingest webhook on the
/// returned port (start ingest listening there), with `bucket` created: the servers of a run
/// that starts from real S3 events.
///
/// # Panics
/// When a server does not start or the bucket cannot be made.
pub async fn servers_for_ingest(bucket: &str) -> (NatsServer, S3Server, aws_sdk_s3::Client, u16) {
    let nats = NatsServer::start()
        .await
        .unwrap_or_else(|e| panic!("nats-server: {e:#}"));
    let ingest_port = reserve_port().unwrap_or_else(|e| panic!("a port for ingest: {e:#}"));
    let s3 = S3Server::start(Some(&format!(
        "http://127.0.0.1:{ingest_port}/v1/events/seaweedfs"
    )))
    .await
    .unwrap_or_else(|e| panic!("SeaweedFS: {e:#}"));
    let client = s3.client().await;
    darkroom_shared::s3::ensure_bucket(&client, bucket)
        .await
        .unwrap_or_else(|e| panic!("bucket {bucket}: {e}"));
    (nats, s3, client, ingest_port)
}

/// Puts `body` at `bucket`/`key` and returns the object as events refer to it (ETag, size).
///
/// # Panics
/// When S3 refuses the PUT.
pub async fn put_object(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
) -> darkroom_events::ObjectRef {
    let size = body.len() as u64;
    let put = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT s3://{bucket}/{key}: {e}"));
    darkroom_events::ObjectRef {
        etag: put.e_tag().map(darkroom_events::s3::normalize_etag),
        size: Some(size),
        ..darkroom_events::ObjectRef::new(bucket, key)
    }
}

/// Publishes the object's S3 `ObjectCreated` record on its bucket's uploads subject, a new
/// message every time (no `Nats-Msg-Id`), the way a re-sent S3 notification arrives.
///
/// # Panics
/// When JetStream refuses the publish.
pub async fn announce_upload(
    js: &async_nats::jetstream::Context,
    object: &darkroom_events::ObjectRef,
) {
    let notification = darkroom_events::S3Notification {
        records: vec![darkroom_events::S3EventRecord::object_created(
            "aws:s3", object, None,
        )],
    };
    let payload = serde_json::to_vec(&notification).unwrap_or_default();
    js.publish(
        darkroom_events::subjects::uploads_subject(&object.bucket),
        payload.into(),
    )
    .await
    .unwrap_or_else(|e| panic!("publish the upload of {object}: {e}"))
    .await
    .unwrap_or_else(|e| panic!("ack of the upload of {object}: {e}"));
}

/// A command for one of Darkroom's binaries (`program`, e.g. `env!("CARGO_BIN_EXE_darkroom-cli")`)
/// as a user would run it: none of the caller's `DARKROOM_*` or `AWS_*` variables (whatever
/// `local-dev/env.sh` exported), stdin closed, killed when dropped. Add its settings with
/// `.env(…)`.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("DARKROOM_") || name.starts_with("AWS_") {
            command.env_remove(name.as_ref());
        }
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

/// Runs `command` to its end: (exit code, stdout, stderr).
///
/// # Panics
/// When it does not exit within `timeout` or cannot be started.
pub async fn output_of(
    command: &mut tokio::process::Command,
    timeout: Duration,
) -> (i32, String, String) {
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not exit within {timeout:?}"))
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A raw NATS protocol connection to `127.0.0.1:port` (blocking, 10 s read timeout), for
/// tests that speak the protocol by hand: the reader, the writer, and the server's `INFO`.
///
/// # Panics
/// When the server cannot be reached or its first line is not `INFO {json}`.
pub fn raw_nats_connection(
    port: u16,
) -> (
    io::BufReader<std::net::TcpStream>,
    std::net::TcpStream,
    serde_json::Value,
) {
    use std::io::BufRead as _;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to nats on {port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("read timeout: {e}"));
    let mut reader = io::BufReader::new(
        stream
            .try_clone()
            .unwrap_or_else(|e| panic!("clone the socket: {e}")),
    );
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("read INFO: {e}"));
    let info = line
        .trim()
        .strip_prefix("INFO ")
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_else(|| panic!("not an INFO line: {line:?}"));
    (reader, stream, info)
}

/// A 320×240 JPEG: a checkerboard whose colours depend on `index`, so every index is a
/// different object (and a different job) with the same quick preprocessing.
pub fn checkerboard_jpeg(index: usize) -> Vec<u8> {
    use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
    let image = RgbImage::from_fn(320, 240, |x, y| {
        let v = if (x / 20 + y / 20) % 2 == 0 { 220 } else { 30 };
        Rgb([v, ((x as usize + index * 7) % 256) as u8, (y % 256) as u8])
    });
    let mut out = io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .write_image(image.as_raw(), 320, 240, ExtendedColorType::Rgb8)
        .unwrap_or_else(|e| panic!("encoding a test JPEG: {e}"));
    out.into_inner()
}

/// [`announce_upload`], retried every 200 ms until JetStream acknowledges it: for uploads
/// announced while a server restarts or a leader is being elected. A retried publish may be
/// stored twice, as a re-sent S3 notification would be, and must still make one job.
///
/// # Panics
/// When no publish is acknowledged within `timeout`.
pub async fn announce_upload_retrying(
    js: &async_nats::jetstream::Context,
    object: &darkroom_events::ObjectRef,
    timeout: Duration,
) {
    let notification = darkroom_events::S3Notification {
        records: vec![darkroom_events::S3EventRecord::object_created(
            "aws:s3", object, None,
        )],
    };
    let payload = serde_json::to_vec(&notification).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let published = match js
            .publish(
                darkroom_events::subjects::uploads_subject(&object.bucket),
                payload.clone().into(),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match published {
            Ok(()) => return,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "announcing {object}: {error}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How many messages of `stream` each subject holds.
///
/// # Panics
/// When the stream cannot be read (see [`stream_messages`]).
pub async fn subject_counts(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in stream_messages(js, stream).await {
        *counts.entry(message.subject.to_string()).or_default() += 1;
    }
    counts
}

/// Subscribes `client` to `subject` and returns once the server has registered the
/// subscription (see [`round_trip`]), so a message published on another connection right after
/// is heard.
///
/// # Panics
/// When the subscription or the round trip fails.
pub async fn subscribe_registered(
    client: &async_nats::Client,
    subject: String,
) -> async_nats::Subscriber {
    let subscriber = client
        .subscribe(subject.clone())
        .await
        .unwrap_or_else(|e| panic!("subscribe {subject}: {e}"));
    round_trip(client)
        .await
        .unwrap_or_else(|e| panic!("after subscribing to {subject}: {e}"));
    subscriber
}

/// Returns once the server has handled everything `client` sent before (its subscriptions
/// above all): `Client::flush` only empties the socket buffer and does not wait for the
/// server, which under load can handle another connection's publish before this one's
/// subscription. The proof is a message to a fresh inbox, sent and heard on the same
/// connection — the server handles one connection's commands in order.
///
/// # Errors
/// When the inbox cannot be subscribed or published to, or no echo comes within 30 s.
pub async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    use futures::StreamExt as _;

    let echo = client.new_inbox();
    let mut echoes = client.subscribe(echo.clone()).await?;
    client.publish(echo.clone(), "".into()).await?;
    tokio::time::timeout(Duration::from_secs(30), echoes.next())
        .await
        .map_err(|_| anyhow::anyhow!("no echo on {echo} within 30 s"))?;
    Ok(())
}

/// Every message in `stream`, oldest first, without consuming any. A read that fails half-way
/// (the stream's leader killed or being elected, a request timing out on a loaded machine) is
/// started again, for up to [`STREAM_READ_PATIENCE`]: a message that cannot be read is never
/// silently left out.
///
/// # Panics
/// When the stream cannot be read within that time.
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let deadline = Instant::now() + STREAM_READ_PATIENCE;
    loop {
        match read_stream(js, stream).await {
            Ok(messages) => return messages,
            Err(error) if Instant::now() < deadline => {
                eprintln!("reading stream {stream}: {error:#}; again in 200 ms");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("reading stream {stream}: {error:#}"),
        }
    }
}

/// How long [`stream_messages`] retries a stream it cannot read.
pub const STREAM_READ_PATIENCE: Duration = Duration::from_secs(30);

async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<Vec<async_nats::jetstream::message::StreamMessage>> {
    use async_nats::jetstream::stream::RawMessageErrorKind;

    let mut stream = js.get_stream(name).await?;
    let state = stream.info().await?.state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return Ok(messages);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(sequence).await {
            Ok(message) => messages.push(message),
            // Deleted (acknowledged work-queue messages): not there to read.
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(error) => anyhow::bail!("message {sequence}: {error}"),
        }
    }
    Ok(messages)
}

/// Polls `probe` every 50 ms until `done` holds, and returns that value.
///
/// # Panics
/// When `done` does not hold within `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn explicit_binary_must_exist() {
        let error = resolve_binary(
            Some("/nonexistent/nats-server".into()),
            NATS_SERVER_BIN_ENV,
            "nats-server",
            Path::new("/nonexistent"),
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains(NATS_SERVER_BIN_ENV), "{error}");
    }

    #[test]
    fn binary_falls_back_to_venv_then_path() {
        let venv = tempfile::tempdir().unwrap();
        let path_dir = tempfile::tempdir().unwrap();
        let make_exe = |dir: &Path| {
            let exe = dir.join("weed");
            fs::write(&exe, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
            exe
        };
        let on_path = make_exe(path_dir.path());
        let path = std::env::join_paths([path_dir.path()]).unwrap();
        let found = resolve_binary(
            Some(OsString::new()),
            WEED_BIN_ENV,
            "weed",
            venv.path(),
            Some(path.clone()),
        )
        .unwrap();
        assert_eq!(found, on_path);
        let in_venv = make_exe(venv.path());
        let found = resolve_binary(None, WEED_BIN_ENV, "weed", venv.path(), Some(path)).unwrap();
        assert_eq!(found, in_venv);
        let missing = resolve_binary(None, WEED_BIN_ENV, "nope", venv.path(), None).unwrap_err();
        assert!(
            missing.to_string().contains("local-dev/install"),
            "{missing}"
        );
    }

    #[test]
    fn leases_never_overlap_and_are_released() {
        let a = PortLease::take(Pool::WithGrpc, 5).unwrap();
        let b = PortLease::take(Pool::WithGrpc, 5).unwrap();
        assert_eq!(a.all.len(), 10);
        for port in &a.base {
            assert!(a.all.contains(&(port + GRPC_PORT_OFFSET)));
        }
        assert!(a.all.iter().all(|port| !b.all.contains(port)));
        let held = a.all.clone();
        drop(a);
        let reserved = reserved();
        assert!(held.iter().all(|port| !reserved.contains(port)));
    }

    #[test]
    fn reserved_ports_are_free_and_stay_reserved() {
        let a = reserve_port().unwrap();
        let b = reserve_port().unwrap();
        assert_ne!(a, b);
        assert!(Pool::Plain.range().contains(&a));
        drop(TcpListener::bind((Ipv4Addr::LOCALHOST, a)).unwrap());
        assert!(reserved().contains(&a) && reserved().contains(&b));
    }

    #[test]
    fn port_clash_is_recognised() {
        assert!(looks_like_port_clash(
            "[FTL] Error listening on port: 127.0.0.1:4222, \"listen tcp 127.0.0.1:4222: bind: address already in use\""
        ));
        assert!(looks_like_port_clash(
            "Port allocation failed: port 29333 for Master (specified by flag master.port) is not available on 127.0.0.1"
        ));
        assert!(!looks_like_port_clash("permission denied"));
    }

    #[test]
    fn weed_readiness_needs_a_volume_server() {
        let empty = serde_json::json!({"Topology": {"DataCenters": [
            {"Id": "dc", "Racks": [{"Id": "rack", "DataNodes": []}]}
        ]}});
        assert!(!weed_has_volume_server(&empty));
        assert!(!weed_has_volume_server(
            &serde_json::json!({"Topology": {}})
        ));
        let one = serde_json::json!({"Topology": {"DataCenters": [
            {"Id": "dc", "Racks": [{"Id": "rack", "DataNodes": [{"Url": "127.0.0.1:1", "Volumes": 1}]}]}
        ]}});
        assert!(weed_has_volume_server(&one));
    }

    #[test]
    fn notification_config_quotes_the_url() {
        let toml = notification_toml("http://127.0.0.1:1/hook?a=\"b\"");
        assert!(toml.contains("endpoint = \"http://127.0.0.1:1/hook?a=\\\"b\\\"\"\n"));
        assert!(toml.contains("path_prefixes = [\"/buckets/\"]"));
    }
}
