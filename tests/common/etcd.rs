//! A real etcd server (Debian's `etcd-server`) on free loopback ports with a temporary data
//! directory, for the discovery tests: plaintext, with mutual TLS, or with user/password auth.
//! Stopped and its data removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::free_port;

pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// The certificate folder (ca.crt, tls.crt, tls.key) of a TLS etcd.
    tls: Option<PathBuf>,
    pub data_dir: PathBuf,
}

/// A number no other call in this process gets, for temporary names.
pub fn unique() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// An etcd that serves https only to clients with a certificate from `certs`/ca.crt, and
    /// presents `certs`/tls.crt (a [`DevCerts`] folder).
    pub fn start_tls(certs: &Path) -> Self {
        Self::start_with(Some(certs.to_path_buf()))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        let data_dir = std::env::temp_dir().join(format!("lazyserve-etcd-{}-{}", std::process::id(), unique()));
        let mut etcd = Self { child: None, client_port: 0, peer_port: 0, tls, data_dir };
        // etcd cannot report a port it picked, and a free port can be taken before etcd binds
        // it: new ports when etcd exits without listening.
        for attempt in 1.. {
            (etcd.client_port, etcd.peer_port) = (free_port(), free_port());
            if etcd.run() {
                break;
            }
            assert!(attempt < 5, "etcd exited before listening, {attempt} times:\n{}", etcd.log());
        }
        etcd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Turns on etcd's auth: a root user (needed to enable it) and `user` with `password`, who
    /// may read and write `prefix` and below and nothing else. A plaintext etcd only.
    pub async fn enable_auth(&self, user: &str, password: &str, prefix: &str) -> anyhow::Result<()> {
        use etcd_client::{Client, Permission};
        anyhow::ensure!(self.tls.is_none(), "enable_auth speaks plaintext");
        let mut c = Client::connect([self.endpoint()], None).await?;
        c.user_add("root", format!("root-{password}"), None).await?;
        c.user_grant_role("root", "root").await?;
        c.role_add(user).await?;
        c.role_grant_permission(user, Permission::read_write(prefix).with_prefix()).await?;
        c.user_add(user, password, None).await?;
        c.user_grant_role(user, user).await?;
        c.auth_enable().await?;
        Ok(())
    }

    /// Starts etcd and waits until it listens; false when it exited first.
    fn run(&mut self) -> bool {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.data_dir.with_extension("log")).expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")]);
        if let Some(certs) = &self.tls {
            cmd.arg("--cert-file").arg(certs.join("tls.crt")).arg("--key-file").arg(certs.join("tls.key"));
            cmd.arg("--trusted-ca-file").arg(certs.join("ca.crt")).arg("--client-cert-auth");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (apt-get install etcd-server; scripts/setup.sh does)");
        let child = self.child.insert(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "etcd did not listen within 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Stops the server (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and TLS; `wipe` starts from empty data (every lease
    /// lost, and the users of [`Etcd::enable_auth`] too).
    pub fn restart(&mut self, wipe: bool) {
        self.stop();
        if wipe {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        assert!(self.run(), "etcd did not start again on its ports:\n{}", self.log());
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}

/// A development CA and a certificate for localhost and 127.0.0.1 signed by it, made by
/// `scripts/dev-certs.sh` in a new temporary folder: ca.crt, tls.crt, tls.key. Each is a new
/// CA. Removed when dropped.
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("lazyserve-certs-{}-{}", std::process::id(), unique()));
        let out = Command::new(crate::repo_root().join("scripts/dev-certs.sh")).arg(&dir).output().expect("dev-certs.sh runs");
        assert!(out.status.success(), "dev-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    /// A file in the folder, as a flag value.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for DevCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
