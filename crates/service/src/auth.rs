//! API keys on the public services: `authorization: Bearer <key>` on gRPC Generation and
//! the HTTP front's /v1 endpoints, a separate key set for Admin. Keys live in a file, one per
//! line, reread when it changes; only their SHA-256 digests are kept, compared in constant
//! time. Health stays open for probes. Keys never reach a log line or `Debug` output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::reload::Reloading;

/// Keys shorter than this are refused: guessable.
pub const MIN_KEY_LEN: usize = 16;

/// API key flags of the services with a public API (router, serve).
#[derive(Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// File of API keys, one per line (blank lines and lines starting with # are skipped);
    /// Generate, ModelInfo and the HTTP /v1 endpoints then need `authorization: Bearer <key>`.
    /// Reread when it changes. Unset: no keys asked.
    #[arg(long, env = "LAZYSERVE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// File of keys for the Admin service (ListWorkers), in the same format. With
    /// --api-keys-file and without this, Admin is refused to everyone.
    #[arg(long, env = "LAZYSERVE_ADMIN_API_KEYS_FILE")]
    pub admin_api_keys_file: Option<PathBuf>,
}

impl AuthArgs {
    /// The checks of the Generation and Admin services (and the HTTP front, which takes the
    /// Generation one).
    pub fn load(&self) -> anyhow::Result<(KeyCheck, KeyCheck)> {
        let load = |path: &Option<PathBuf>| path.as_deref().map(ApiKeys::load).transpose();
        let (generation, admin) = (load(&self.api_keys_file)?, load(&self.admin_api_keys_file)?);
        let admin = match (&generation, admin) {
            (_, Some(keys)) => KeyCheck::Keys(keys),
            (Some(_), None) => KeyCheck::Closed,
            (None, None) => KeyCheck::Open,
        };
        Ok((generation.map_or(KeyCheck::Open, KeyCheck::Keys), admin))
    }
}

/// A key file's keys, as digests. The file is reread when it changes ([`Reloading`]): a file
/// that cannot be used keeps the previous keys (a half-written file must not lock everyone
/// out); an empty one removes them all.
pub struct ApiKeys {
    path: PathBuf,
    digests: Reloading<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("path", &self.path).field("keys", &self.digests.current().len()).finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The keys in a key file's text; an error names the line, never the key.
fn parse(text: &str) -> Result<Vec<[u8; 32]>, String> {
    let mut digests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if key.len() < MIN_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("line {}: a key is at least {MIN_KEY_LEN} printable ASCII characters without spaces", i + 1));
        }
        digests.push(digest(key.as_bytes()));
    }
    Ok(digests)
}

/// Reads and parses a key file.
fn read_keys(path: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading API keys file {}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("API keys file {}: {e}", path.display()))
}

impl ApiKeys {
    /// Reads the file; it must hold at least one key.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let digests = Reloading::new(format!("API keys file {}", path.display()), vec![path.to_path_buf()], |paths| read_keys(&paths[0]))?;
        let keys = digests.current().len();
        anyhow::ensure!(keys > 0, "API keys file {} holds no key", path.display());
        tracing::info!(path = %path.display(), keys, "API keys loaded");
        Ok(Arc::new(Self { path: path.to_path_buf(), digests }))
    }

    /// Whether `key` is one of the keys, comparing with every key in constant time.
    pub fn allows(&self, key: &str) -> bool {
        let presented = digest(key.as_bytes());
        let mut found = subtle::Choice::from(0);
        for d in self.digests.current().iter() {
            found |= d[..].ct_eq(&presented[..]);
        }
        found.into()
    }
}

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Closed,
}

impl Refusal {
    pub fn message(&self) -> &'static str {
        match self {
            Self::Missing => "missing API key: send the header `authorization: Bearer <key>`",
            Self::Invalid => "invalid API key",
            Self::Closed => "the Admin service takes only its own keys (--admin-api-keys-file), and this server has none",
        }
    }
}

/// What a service asks of its callers.
#[derive(Clone, Debug)]
pub enum KeyCheck {
    Open,
    Keys(Arc<ApiKeys>),
    /// Refused to everyone.
    Closed,
}

impl KeyCheck {
    /// Checks the value of an `authorization` header (`Bearer <key>`).
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let keys = match self {
            Self::Open => return Ok(()),
            Self::Closed => return Err(Refusal::Closed),
            Self::Keys(keys) => keys,
        };
        let value = authorization.and_then(|v| std::str::from_utf8(v).ok()).ok_or(Refusal::Missing)?;
        let key = match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => return Err(Refusal::Missing),
        };
        if keys.allows(key) { Ok(()) } else { Err(Refusal::Invalid) }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }
}

impl Interceptor for KeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.check(request.metadata().get("authorization").map(|v| v.as_bytes())) {
            Ok(()) => Ok(request),
            Err(r @ Refusal::Closed) => Err(Status::permission_denied(r.message())),
            Err(r) => Err(Status::unauthenticated(r.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> anyhow::Result<(tempfile::TempDir, KeyCheck)> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("keys"), text)?;
        let check = KeyCheck::Keys(ApiKeys::load(&dir.path().join("keys"))?);
        Ok((dir, check))
    }

    #[test]
    fn bearer_keys_are_checked() -> anyhow::Result<()> {
        let (_dir, check) = keys("# ops\n\nsk-first-key-0123456789\n  sk-second-key-0123456789  \n")?;
        assert_eq!(check.check(Some(b"Bearer sk-first-key-0123456789")), Ok(()));
        assert_eq!(check.check(Some(b"bearer sk-second-key-0123456789")), Ok(()));
        assert_eq!(check.check(Some(b"Bearer sk-first-key-012345678")), Err(Refusal::Invalid));
        assert_eq!(check.check(Some(b"Bearer # ops")), Err(Refusal::Invalid));
        assert_eq!(check.check(Some(b"sk-first-key-0123456789")), Err(Refusal::Missing));
        assert_eq!(check.check(Some(b"Basic sk-first-key-0123456789")), Err(Refusal::Missing));
        assert_eq!(check.check(None), Err(Refusal::Missing));
        assert_eq!(KeyCheck::Open.check(None), Ok(()));
        assert_eq!(KeyCheck::Closed.check(Some(b"Bearer sk-first-key-0123456789")), Err(Refusal::Closed));
        Ok(())
    }

    #[test]
    fn bad_key_files_are_refused_without_printing_keys() -> anyhow::Result<()> {
        assert!(keys("# nothing\n").is_err());
        let e = keys("sk-good-key-0123456789\nshort\n").err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("line 2") && !e.contains("short"), "{e}");
        let (_dir, check) = keys("sk-good-key-0123456789\n")?;
        assert!(!format!("{check:?}").contains("sk-good"));
        Ok(())
    }

    #[test]
    fn a_changed_file_is_reread() -> anyhow::Result<()> {
        let (dir, check) = keys("sk-old-key-0123456789\n")?;
        let KeyCheck::Keys(k) = &check else { unreachable!() };
        std::fs::write(dir.path().join("keys"), "sk-new-key-0123456789-longer\n")?;
        // Force the next call to look at the file (it looks at most once a second).
        k.digests.check_now();
        assert_eq!(check.check(Some(b"Bearer sk-new-key-0123456789-longer")), Ok(()));
        assert_eq!(check.check(Some(b"Bearer sk-old-key-0123456789")), Err(Refusal::Invalid));
        // A file that becomes unusable keeps the keys that were good.
        std::fs::write(dir.path().join("keys"), "tiny\n")?;
        k.digests.check_now();
        assert_eq!(check.check(Some(b"Bearer sk-new-key-0123456789-longer")), Ok(()));
        Ok(())
    }
}
