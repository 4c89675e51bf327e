//! The cluster's shared secrets: what keeps strangers out of gossip and the internal API.
//!
//! Off unless `shoal.cluster.secret` (or `secret-file`) is set. Each secret gives three keys:
//! a ChaCha20-Poly1305 key that seals every gossip datagram, an HMAC-SHA256 key that signs
//! every internal HTTP request, and a 4-byte id sent in the clear so the receiver picks the
//! right key without trying each. The ring holds one **primary** key (used to seal and sign)
//! and any number of others that are still accepted, so a running cluster rotates its secret
//! the way memberlist's keyring does, with no downtime: `install` the new secret everywhere,
//! `use` it everywhere, then `remove` the old one. Changes made at run time persist in
//! `<data-dir>/keyring` (mode 0600); once that file exists the configured secret is ignored
//! (as Consul does), so a removed secret left in a config file does not come back.
//!
//! Cryptography comes from `ring` (already in the dependency tree through hickory).

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Shortest secret accepted: `shoal keygen` prints 44 characters (32 random bytes, base64).
pub const SECRET_CHARS_MIN: usize = 16;
/// How far a signed request's time may be from ours: bounds both clock skew and how long a
/// captured request could be replayed (every internal write is idempotent: points are a set).
pub const SIGNATURE_SKEW_MS: i64 = 5 * 60 * 1000;
/// Headers of a signed internal request.
pub const KEY_ID_HEADER: &str = "x-shoal-key";
pub const TIME_HEADER: &str = "x-shoal-time";
pub const SIGNATURE_HEADER: &str = "x-shoal-signature";
/// A sealed datagram: version, key id, nonce, then the ciphertext and its 16-byte tag.
const SEALED_VERSION: u8 = 1;
const KEY_ID_BYTES: usize = 4;
pub const SEAL_OVERHEAD_BYTES: usize = 1 + KEY_ID_BYTES + NONCE_LEN + 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("a cluster secret needs at least {SECRET_CHARS_MIN} characters (`shoal keygen` makes one)")]
    TooShort,
    #[error("the keyring has no key {0}")]
    Unknown(String),
    #[error("the primary key cannot be removed: `use` another one first")]
    RemovePrimary,
    #[error("cluster security is off (no shoal.cluster.secret): there is no keyring to change")]
    Off,
    #[error("keyring file {path}: {message}")]
    File { path: String, message: String },
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// The keys derived from one secret.
struct ClusterKey {
    secret: String,
    id: [u8; KEY_ID_BYTES],
    seal: LessSafeKey,
    sign: ring::hmac::Key,
}

impl ClusterKey {
    fn new(secret: &str) -> Result<Self, KeyringError> {
        let secret = secret.trim();
        if secret.chars().count() < SECRET_CHARS_MIN {
            return Err(KeyringError::TooShort);
        }
        let s = secret.as_bytes();
        let seal = sha256(&[b"shoal/gossip-seal/v1\0", s]);
        let sign = sha256(&[b"shoal/internal-sign/v1\0", s]);
        let id = sha256(&[b"shoal/key-id/v1\0", s]);
        Ok(Self {
            secret: secret.to_string(),
            id: id[..KEY_ID_BYTES].try_into().expect("4 bytes"),
            seal: LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &seal).expect("32-byte key")),
            sign: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &sign),
        })
    }

    fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

struct Keys {
    /// The first is the primary.
    keys: Vec<ClusterKey>,
}

/// What `GET /cluster/keyring` shows: key ids only, never secrets.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeyringView {
    pub primary: String,
    pub keys: Vec<String>,
}

/// A keyring change, applied on every live member (`POST /cluster/keyring`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "op", content = "key")]
pub enum KeyringOp {
    /// Accept a new secret (seal and sign with it only after `use`).
    Install(String),
    /// Make an installed secret the primary.
    Use(String),
    /// Stop accepting a secret.
    Remove(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyringFile {
    /// Primary first.
    secrets: Vec<String>,
}

pub struct Keyring {
    keys: RwLock<Keys>,
    file: PathBuf,
    rng: SystemRandom,
    /// Gossip datagrams and internal requests refused for want of a key of this ring
    /// (`shoal_auth_rejected_total{kind="cluster"}`).
    pub rejected: std::sync::atomic::AtomicU64,
}

impl Keyring {
    /// The node's keyring: `<data_dir>/keyring` if a runtime change saved one, otherwise the
    /// configured secret. `None` when neither exists: security is off.
    pub fn open(data_dir: &Path, configured: Option<&str>) -> Result<Option<Self>, KeyringError> {
        let file = data_dir.join("keyring");
        let err = |message: String| KeyringError::File { path: file.display().to_string(), message };
        let configured = configured.map(str::trim).filter(|s| !s.is_empty());
        let secrets: Vec<String> = match std::fs::read(&file) {
            Ok(bytes) => {
                let saved = serde_json::from_slice::<KeyringFile>(&bytes).map_err(|e| err(e.to_string()))?.secrets;
                if configured.is_some_and(|c| !saved.iter().any(|s| s == c)) {
                    tracing::warn!(keyring = %file.display(), "the configured cluster secret is not in the saved keyring and is ignored: the keyring holds the rotations made since");
                }
                saved
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => configured.map(String::from).into_iter().collect(),
            Err(e) => return Err(err(e.to_string())),
        };
        if secrets.is_empty() {
            return Ok(None);
        }
        let keys = secrets.iter().map(|s| ClusterKey::new(s)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            keys: RwLock::new(Keys { keys }),
            file,
            rng: SystemRandom::new(),
            rejected: Default::default(),
        }))
    }

    pub fn view(&self) -> KeyringView {
        let keys = self.keys.read().expect("keyring lock");
        KeyringView { primary: keys.keys[0].id_hex(), keys: keys.keys.iter().map(ClusterKey::id_hex).collect() }
    }

    /// Applies a change and saves the ring.
    pub fn apply(&self, op: &KeyringOp) -> Result<KeyringView, KeyringError> {
        let mut keys = self.keys.write().expect("keyring lock");
        match op {
            KeyringOp::Install(secret) => {
                let key = ClusterKey::new(secret)?;
                if !keys.keys.iter().any(|k| k.id == key.id) {
                    keys.keys.push(key);
                }
            }
            KeyringOp::Use(secret) => {
                let id = ClusterKey::new(secret)?.id;
                let at = keys.keys.iter().position(|k| k.id == id).ok_or_else(|| KeyringError::Unknown(hex(&id)))?;
                let key = keys.keys.remove(at);
                keys.keys.insert(0, key);
            }
            KeyringOp::Remove(secret) => {
                let id = ClusterKey::new(secret)?.id;
                match keys.keys.iter().position(|k| k.id == id) {
                    Some(0) => return Err(KeyringError::RemovePrimary),
                    Some(at) => {
                        keys.keys.remove(at);
                    }
                    None => {}
                }
            }
        }
        let file = KeyringFile { secrets: keys.keys.iter().map(|k| k.secret.clone()).collect() };
        let bytes = serde_json::to_vec(&file).expect("keyring encodes");
        let err = |message: String| KeyringError::File { path: self.file.display().to_string(), message };
        crate::storage::write_atomic(&self.file, &bytes).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(&self.file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| err(e.to_string()))?;
        drop(keys);
        Ok(self.view())
    }

    /// Seals a gossip datagram with the primary key; `context` (the cluster id) is
    /// authenticated too, so the same secret in two clusters does not mix them.
    pub fn seal(&self, plaintext: &[u8], context: &[u8], out: &mut Vec<u8>) {
        let keys = self.keys.read().expect("keyring lock");
        let key = &keys.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the system RNG works");
        out.clear();
        out.push(SEALED_VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let mut body = out.split_off(body_at);
        key.seal
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context), &mut body)
            .expect("ChaCha20-Poly1305 seals any length a datagram has");
        out.extend_from_slice(&body);
    }

    /// Opens a sealed datagram: its plaintext, or `None` when no key of the ring opens it
    /// (a stranger, a removed key, a forgery, plain chitchat).
    pub fn open_sealed<'a>(&self, datagram: &'a mut [u8], context: &[u8]) -> Option<&'a [u8]> {
        let header = 1 + KEY_ID_BYTES + NONCE_LEN;
        if datagram.len() < header + 16 || datagram[0] != SEALED_VERSION {
            return None;
        }
        let keys = self.keys.read().expect("keyring lock");
        let key = keys.keys.iter().find(|k| k.id[..] == datagram[1..1 + KEY_ID_BYTES])?;
        let nonce = Nonce::try_assume_unique_for_key(&datagram[1 + KEY_ID_BYTES..header]).ok()?;
        let plain = key.seal.open_in_place(nonce, Aad::from(context), &mut datagram[header..]).ok()?;
        Some(&*plain)
    }

    fn mac(key: &ClusterKey, method: &str, path: &str, time_ms: i64, body: &[u8]) -> ring::hmac::Tag {
        let mut ctx = ring::hmac::Context::with_key(&key.sign);
        for part in [method.as_bytes(), b"\n", path.as_bytes(), b"\n", time_ms.to_string().as_bytes(), b"\n", body] {
            ctx.update(part);
        }
        ctx.sign()
    }

    /// The headers that sign an internal request with the primary key.
    pub fn sign(&self, method: &str, path: &str, time_ms: i64, body: &[u8]) -> [(&'static str, String); 3] {
        let keys = self.keys.read().expect("keyring lock");
        let key = &keys.keys[0];
        let tag = Self::mac(key, method, path, time_ms, body);
        [(KEY_ID_HEADER, key.id_hex()), (TIME_HEADER, time_ms.to_string()), (SIGNATURE_HEADER, hex(tag.as_ref()))]
    }

    /// Checks a signed internal request; the error says what was wrong (for a 401).
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
        body: &[u8],
        now_ms: i64,
    ) -> Result<(), String> {
        let (Some(id), Some(time), Some(signature)) =
            (header(KEY_ID_HEADER), header(TIME_HEADER), header(SIGNATURE_HEADER))
        else {
            return Err(format!(
                "internal requests must be signed with the cluster secret ({KEY_ID_HEADER}, {TIME_HEADER}, {SIGNATURE_HEADER})"
            ));
        };
        let time_ms: i64 = time.parse().map_err(|_| format!("{TIME_HEADER} is not a time in ms: {time:?}"))?;
        if (now_ms - time_ms).abs() > SIGNATURE_SKEW_MS {
            return Err(format!("the request was signed at {time_ms}, too far from this node's time {now_ms}"));
        }
        let signature = unhex(&signature).ok_or_else(|| format!("{SIGNATURE_HEADER} is not hex"))?;
        let keys = self.keys.read().expect("keyring lock");
        let key = keys
            .keys
            .iter()
            .find(|k| k.id_hex() == id)
            .ok_or_else(|| format!("the request is signed with key {id:?}, which this node's keyring lacks"))?;
        let expected = Self::mac(key, method, path, time_ms, body);
        // Compared in constant time: a timing difference must not reveal how much of a
        // forged signature was right.
        let differ = expected.as_ref().len() != signature.len()
            || expected.as_ref().iter().zip(&signature).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0;
        if differ {
            return Err("the request's signature does not match its content".into());
        }
        Ok(())
    }
}

/// A fresh secret for `shoal keygen`: 32 random bytes, base64.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).expect("the system RNG works");
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a-secret-of-enough-length";
    const B: &str = "another-secret-long-enough";

    fn ring(dir: &Path, secret: &str) -> Keyring {
        Keyring::open(dir, Some(secret)).unwrap().unwrap()
    }

    #[test]
    fn sealed_datagrams_open_only_with_a_key_of_the_ring_and_the_same_context() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (ring(d1.path(), A), ring(d2.path(), B));
        let mut sealed = Vec::new();
        a.seal(b"hello gossip", b"shoal", &mut sealed);
        assert_eq!(sealed.len(), b"hello gossip".len() + SEAL_OVERHEAD_BYTES);
        assert!(!sealed.windows(5).any(|w| w == b"hello"), "the payload is encrypted");
        assert_eq!(a.open_sealed(&mut sealed.clone(), b"shoal"), Some(&b"hello gossip"[..]));
        assert_eq!(b.open_sealed(&mut sealed.clone(), b"shoal"), None, "another secret cannot open it");
        assert_eq!(a.open_sealed(&mut sealed.clone(), b"other"), None, "nor another cluster id");
        let mut forged = sealed.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(a.open_sealed(&mut forged, b"shoal"), None, "a changed byte fails the tag");
        assert_eq!(a.open_sealed(&mut b"plain chitchat".to_vec(), b"shoal"), None);
        assert!(Keyring::open(d1.path(), Some("short")).is_err_and(|e| matches!(e, KeyringError::TooShort)));
        assert!(Keyring::open(tempfile::tempdir().unwrap().path(), None).unwrap().is_none(), "off by default");
    }

    #[test]
    fn rotation_installs_uses_and_removes_and_survives_restart() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (ring(d1.path(), A), ring(d2.path(), A));
        // b moves to B first: a must accept B before anyone seals with it.
        a.apply(&KeyringOp::Install(B.into())).unwrap();
        b.apply(&KeyringOp::Install(B.into())).unwrap();
        b.apply(&KeyringOp::Use(B.into())).unwrap();
        let mut sealed = Vec::new();
        b.seal(b"x", b"c", &mut sealed);
        assert!(a.open_sealed(&mut sealed, b"c").is_some(), "a accepts the installed key");
        let headers = a.sign("POST", "/internal/v1/write", 1000, b"body");
        let get = |h: &str| headers.iter().find(|(k, _)| *k == h).map(|(_, v)| v.clone());
        assert!(b.verify("POST", "/internal/v1/write", get, b"body", 2000).is_ok(), "b still accepts A");
        assert!(b.verify("POST", "/internal/v1/write", get, b"bodx", 2000).unwrap_err().contains("does not match"));
        assert!(b.verify("POST", "/internal/v1/drop", get, b"body", 2000).is_err(), "the path is signed");
        assert!(b.verify("POST", "/internal/v1/write", get, b"body", 1000 + SIGNATURE_SKEW_MS + 1).is_err());
        assert!(matches!(b.apply(&KeyringOp::Remove(B.into())), Err(KeyringError::RemovePrimary)));
        b.apply(&KeyringOp::Remove(A.into())).unwrap();
        assert!(b.verify("POST", "/internal/v1/write", get, b"body", 2000).unwrap_err().contains("lacks"));
        // The saved ring wins over the config at the next start: the removed A stays out.
        drop(b);
        let b = ring(d2.path(), A);
        assert_eq!(
            b.view(),
            KeyringView {
                primary: ClusterKey::new(B).unwrap().id_hex(),
                keys: vec![ClusterKey::new(B).unwrap().id_hex()]
            }
        );
    }
}
