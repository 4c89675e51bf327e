//! Users and permissions for the public API, in the spirit of rqlite's auth file, with
//! passwords stored as argon2 hashes (`shoal hash-password` makes one).
//!
//! Off unless `shoal.auth.file` names a users file:
//!
//! ```json
//! {"users": [
//!   {"username": "admin", "password_hash": "$argon2id$...", "perms": {"*": ["admin"]}},
//!   {"username": "grafana", "password_hash": "$argon2id$...", "perms": {"metrics": ["read"]}}
//! ]}
//! ```
//!
//! `perms` maps a db (or `*`, every db) to `read`, `write` and/or `admin`; `admin` includes the
//! other two. Cluster operations (`/cluster/leave`, the keyring) need `admin` on `*`.
//! Credentials come as HTTP Basic, as InfluxDB 1.x's `Authorization: Token user:password`, or
//! as its `u` and `p` query parameters. A password that verified once is remembered by its
//! SHA-256 for the life of the process, so argon2 (deliberately slow) runs once per user, not
//! once per request.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    Read,
    Write,
    Admin,
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::Admin => "admin",
        })
    }
}

/// The db that stands for every db in a users file, and for cluster-wide operations.
pub const ALL_DBS: &str = "*";
/// Most users a users file may hold.
const USERS_MAX: usize = 10_000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    username: String,
    password_hash: String,
    #[serde(default)]
    perms: BTreeMap<String, Vec<Perm>>,
}

struct User {
    hash: String,
    perms: BTreeMap<String, Vec<Perm>>,
}

pub struct Users {
    users: HashMap<String, User>,
    /// SHA-256 of each password that verified, by user.
    verified: Mutex<HashMap<String, [u8; 32]>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required (HTTP Basic, `Authorization: Token user:password`, or u and p parameters)")]
    Missing,
    #[error("unknown user or wrong password")]
    Wrong,
    #[error("malformed credentials: {0}")]
    Malformed(String),
}

/// Who is calling, once authenticated. With users off every caller is `Caller::anyone()`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: Option<String>,
    perms: Option<Arc<BTreeMap<String, Vec<Perm>>>>,
}

impl Caller {
    /// The caller when the node has no users file: allowed everything.
    pub fn anyone() -> Self {
        Self { user: None, perms: None }
    }

    pub fn allows(&self, db: &str, perm: Perm) -> bool {
        let Some(perms) = &self.perms else { return true };
        let grants = |key: &str| perms.get(key).is_some_and(|ps| ps.iter().any(|p| *p == perm || *p == Perm::Admin));
        grants(ALL_DBS) || (db != ALL_DBS && grants(db))
    }

    /// Ok, or the 403 message naming what is missing.
    pub fn require(&self, db: &str, perm: Perm) -> Result<(), String> {
        if self.allows(db, perm) {
            return Ok(());
        }
        let who = self.user.as_deref().unwrap_or("anonymous");
        Err(if db == ALL_DBS {
            format!("user {who:?} lacks {perm} permission on the cluster (\"*\")")
        } else {
            format!("user {who:?} lacks {perm} permission on db {db:?}")
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().try_into().expect("32 bytes")
}

impl Users {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("users file {}: {e}", path.display()))?;
        let file: UsersFile =
            serde_json::from_slice(&text).map_err(|e| format!("users file {}: {e}", path.display()))?;
        if file.users.len() > USERS_MAX {
            return Err(format!("users file {}: more than {USERS_MAX} users", path.display()));
        }
        let mut users = HashMap::new();
        for u in file.users {
            PasswordHash::new(&u.password_hash).map_err(|e| {
                format!(
                    "users file {}: user {:?}: password_hash is not an argon2 hash ({e}); make one with `shoal hash-password`",
                    path.display(),
                    u.username
                )
            })?;
            if users.insert(u.username.clone(), User { hash: u.password_hash, perms: u.perms }).is_some() {
                return Err(format!("users file {}: user {:?} is listed twice", path.display(), u.username));
            }
        }
        Ok(Self { users, verified: Default::default() })
    }

    /// Checks a user name and password; argon2 runs on a blocking thread.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<Caller, AuthError> {
        let entry = self.users.get(user).ok_or(AuthError::Wrong)?;
        let digest = sha256(password.as_bytes());
        let known = self.verified.lock().expect("users lock").get(user) == Some(&digest);
        if !known {
            let (hash, password) = (entry.hash.clone(), password.to_string());
            let ok = crate::env::spawn_blocking(move || {
                PasswordHash::new(&hash)
                    .is_ok_and(|parsed| argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            })
            .await
            .unwrap_or(false);
            if !ok {
                return Err(AuthError::Wrong);
            }
            self.verified.lock().expect("users lock").insert(user.to_string(), digest);
        }
        Ok(Caller { user: Some(user.to_string()), perms: Some(Arc::new(entry.perms.clone())) })
    }
}

/// The user name and password a request carries, if any.
pub fn credentials(
    authorization: Option<&str>,
    query: &HashMap<String, String>,
) -> Result<Option<(String, String)>, AuthError> {
    let split = |pair: &str| {
        pair.split_once(':')
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .ok_or_else(|| AuthError::Malformed("expected user:password".into()))
    };
    if let Some(value) = authorization {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        return match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, rest.trim())
                    .map_err(|e| AuthError::Malformed(format!("Basic credentials are not base64: {e}")))?;
                let pair = String::from_utf8(bytes).map_err(|_| AuthError::Malformed("not UTF-8".into()))?;
                split(&pair).map(Some)
            }
            "token" => split(rest.trim()).map(Some),
            other => {
                Err(AuthError::Malformed(format!("unsupported Authorization scheme {other:?} (use Basic or Token)")))
            }
        };
    }
    match (query.get("u"), query.get("p")) {
        (Some(u), Some(p)) => Ok(Some((u.clone(), p.clone()))),
        (None, None) => Ok(None),
        _ => Err(AuthError::Malformed("the u and p parameters go together".into())),
    }
}

/// An argon2id hash of `password` with a random salt, for a users file.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_against_argon2_hashes_and_perms_are_per_db() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.json");
        let file = serde_json::json!({"users": [
            {"username": "root", "password_hash": hash_password("pw-root").unwrap(), "perms": {"*": ["admin"]}},
            {"username": "ro", "password_hash": hash_password("pw-ro").unwrap(), "perms": {"metrics": ["read"]}},
        ]});
        std::fs::write(&path, file.to_string()).unwrap();
        let users = Users::load(&path).unwrap();
        assert!(matches!(users.authenticate("ro", "nope").await, Err(AuthError::Wrong)));
        assert!(matches!(users.authenticate("nobody", "pw-ro").await, Err(AuthError::Wrong)));
        let ro = users.authenticate("ro", "pw-ro").await.unwrap();
        assert!(ro.allows("metrics", Perm::Read) && !ro.allows("metrics", Perm::Write));
        assert!(!ro.allows("other", Perm::Read) && !ro.allows(ALL_DBS, Perm::Read));
        assert!(ro.require("metrics", Perm::Admin).unwrap_err().contains("lacks admin permission on db"));
        // The second time the remembered digest answers; a wrong password still fails.
        assert!(users.authenticate("ro", "pw-ro").await.is_ok());
        assert!(users.authenticate("ro", "pw-rO").await.is_err());
        let root = users.authenticate("root", "pw-root").await.unwrap();
        assert!(root.allows("anything", Perm::Write) && root.allows(ALL_DBS, Perm::Admin));
        assert!(Caller::anyone().allows(ALL_DBS, Perm::Admin));

        std::fs::write(&path, r#"{"users": [{"username": "x", "password_hash": "plain", "perms": {}}]}"#).unwrap();
        assert!(Users::load(&path).err().unwrap().contains("shoal hash-password"));
    }

    #[test]
    fn credentials_come_from_basic_token_or_u_and_p() {
        let none = HashMap::new();
        let basic = format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "a:b:c"));
        assert_eq!(credentials(Some(&basic), &none).unwrap(), Some(("a".into(), "b:c".into())));
        assert_eq!(credentials(Some("Token a:b"), &none).unwrap(), Some(("a".into(), "b".into())));
        let q: HashMap<String, String> = [("u".into(), "a".into()), ("p".into(), "b".into())].into();
        assert_eq!(credentials(None, &q).unwrap(), Some(("a".into(), "b".into())));
        assert_eq!(credentials(None, &none).unwrap(), None);
        assert!(credentials(Some("Bearer x"), &none).is_err());
        assert!(credentials(Some("Basic !!"), &none).is_err());
    }
}
