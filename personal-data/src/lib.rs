//! Customers' personal data, sealed so that it can be erased from every copy at once
//! (crypto-shredding).
//!
//! Every personal field (a name, an email address, free text a customer wrote) is sealed with
//! [`seal`] before it enters a command, so the log, its replicas, snapshots and read models
//! hold only [`Sealed`] values. The key each customer's fields are sealed with lives only in the
//! [`KeyStore`], in a database of the platform's own; erasing the customer clears that key,
//! after which no sealed copy anywhere opens again ([`open`] answers [`Opened::Erased`]).
//!
//! What holds:
//! - A key is on disk before any field sealed with it is: [`KeyStore::key_for_registration`]
//!   commits (synced) before it returns, and the caller appends afterwards. A key lost after
//!   its fields were appended would erase them by accident.
//! - An erased customer never gets a new key: the erased row stays as a tombstone.
//! - Each field is sealed with the customer's id and the field's name as associated data, so
//!   a sealed value cannot be passed off as another customer's or another field.
//! - On SQLite the key's bytes are zeroed in the file (`secure_delete`) and the WAL that held
//!   them is truncated; on Postgres the row's old version is vacuumed. Copies outside the
//!   platform's reach (backups, the file system's free blocks, Postgres' WAL archive) are the
//!   operator's: they hold the key until they are rotated out.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use domain::CustomerId;
pub use domain::customer::Sealed;
use sql_store::{Db, DbError, Migrations, Value, fetch_for_keys};
use zeroize::Zeroize;

pub static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
    sql_store::migrations!(
        "keys",
        "../migrations/keys/20261210000101_customer_keys.sql"
    )
});

/// Bytes of a data key.
const KEY_LEN: usize = 32;
/// Bytes of an XChaCha20 nonce.
const NONCE_LEN: usize = 24;

/// One customer's data key. Never printed, and wiped from memory when dropped.
#[derive(Clone)]
pub struct DataKey([u8; KEY_LEN]);

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl DataKey {
    fn generate() -> DataKey {
        DataKey(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    fn from_stored(text: &str) -> Option<DataKey> {
        let mut bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let key = <[u8; KEY_LEN]>::try_from(bytes.as_slice())
            .ok()
            .map(DataKey);
        bytes.zeroize();
        key
    }

    fn to_stored(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// The associated data of a sealed field: whose it is and which field.
fn associated(customer: &CustomerId, field: &str) -> Vec<u8> {
    format!("{customer}\u{0}{field}").into_bytes()
}

/// Seals `plaintext` as `field` of `customer` with the customer's key, under a fresh random
/// nonce (so the same text seals differently each time).
pub fn seal(key: &DataKey, customer: &CustomerId, field: &str, plaintext: &str) -> Sealed {
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = associated(customer, field);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: &aad,
            },
        )
        // Encryption fails only for a message beyond the cipher's limit (256 GiB).
        .expect("a field is far below XChaCha20-Poly1305's message limit");
    let mut bytes = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&ciphertext);
    Sealed::parse(&format!(
        "{}{}",
        Sealed::PREFIX,
        URL_SAFE_NO_PAD.encode(&bytes)
    ))
    .expect("a fresh seal has the sealed form")
}

/// A fingerprint of `text` (a request carrying personal fields, to recognise its retries):
/// the hex HMAC-SHA-256 of it under the customer's key. A plain hash of an email address can be
/// reversed by hashing candidate addresses; this cannot without the key, and once the key is
/// erased, by anyone.
pub fn fingerprint(key: &DataKey, text: &str) -> String {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&key.0)
        .expect("HMAC takes a key of any length");
    mac.update(text.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Every sealed value in `value` (a JSON document: an event, a snapshot, a row), with the name
/// of the field that holds it (its object key; for an element of a list, the list's key).
pub fn sealed_fields(value: &serde_json::Value) -> Vec<(String, Sealed)> {
    fn walk(value: &serde_json::Value, field: &str, found: &mut Vec<(String, Sealed)>) {
        match value {
            serde_json::Value::String(text) if text.starts_with(Sealed::PREFIX) => {
                if let Ok(sealed) = Sealed::parse(text) {
                    found.push((field.to_owned(), sealed));
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, field, found);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    walk(item, key, found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(value, "", &mut found);
    found
}

/// What a sealed field shows a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Text(String),
    /// The customer was erased: the key is gone, and so is the text, for good.
    Erased,
    /// No key matches it (not sealed for this customer and field, altered, or its key was
    /// never stored): shown as unreadable, never guessed at.
    Unreadable,
}

impl Opened {
    /// The text, or a placeholder a page or an email can show: `[erased]`, `[unreadable]`.
    pub fn shown(&self) -> &str {
        match self {
            Opened::Text(text) => text,
            Opened::Erased => "[erased]",
            Opened::Unreadable => "[unreadable]",
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Opened::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// Opens `sealed` as `field` of `customer` with the key `key` found for them.
pub fn open(key: &KeyState, customer: &CustomerId, field: &str, sealed: &Sealed) -> Opened {
    let key = match key {
        KeyState::Live(key) => key,
        KeyState::Erased { .. } => return Opened::Erased,
        KeyState::Unknown => return Opened::Unreadable,
    };
    let Some(body) = sealed.as_str().strip_prefix(Sealed::PREFIX) else {
        return Opened::Unreadable;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(body) else {
        return Opened::Unreadable;
    };
    if bytes.len() < NONCE_LEN {
        return Opened::Unreadable;
    }
    let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let aad = associated(customer, field);
    match cipher.decrypt(
        XNonce::from_slice(nonce),
        Payload {
            msg: ciphertext,
            aad: &aad,
        },
    ) {
        Ok(plain) => match String::from_utf8(plain) {
            Ok(text) => Opened::Text(text),
            Err(_) => Opened::Unreadable,
        },
        Err(_) => Opened::Unreadable,
    }
}

/// A customer's key as the store holds it.
#[derive(Debug, Clone)]
pub enum KeyState {
    Live(DataKey),
    /// Erased at this time (ms since the epoch).
    Erased {
        at: i64,
    },
    /// No key was ever made for the customer.
    Unknown,
}

/// Why the key store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("customer {0} was erased: no key is made for them again")]
    Erased(CustomerId),
    #[error("the key store: {0}")]
    Db(#[from] DbError),
    #[error("the key store holds an unreadable key for customer {0}")]
    Corrupt(CustomerId),
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// When the key was erased (ms since the epoch); the first erasure's time on a repeat.
    pub erased_at: i64,
    /// False when the customer's key had been erased before.
    pub first: bool,
    /// Whether the store's files no longer hold the key's old bytes: on SQLite, whether the
    /// WAL was truncated (another connection reading at the time keeps it; the next erasure or
    /// checkpoint clears it); on Postgres, whether the table was vacuumed.
    pub purged: bool,
}

/// The customers' data keys, in a database of their own (see the module documentation).
#[derive(Debug, Clone)]
pub struct KeyStore {
    db: Db,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl KeyStore {
    /// The key store on `db` (open it with [`Db::sqlite_secure`] on SQLite), migrated.
    pub async fn open(db: Db) -> Result<KeyStore, KeyError> {
        sql_store::migrate(&db, &MIGRATIONS).await?;
        Ok(KeyStore { db })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The key to seal a customer's fields with: made and stored (committed, synced) on the
    /// first call for the customer, the same key after. Refused once the customer is erased.
    pub async fn key_for_registration(&self, customer: &CustomerId) -> Result<DataKey, KeyError> {
        let fresh = DataKey::generate();
        self.db
            .execute(
                "INSERT INTO customer_keys (customer_id, data_key, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (customer_id) DO NOTHING",
                &[
                    customer.as_str().into(),
                    fresh.to_stored().into(),
                    now_ms().into(),
                ],
            )
            .await?;
        match self.key(customer).await? {
            KeyState::Live(key) => Ok(key),
            KeyState::Erased { .. } => Err(KeyError::Erased(customer.clone())),
            // Inserted above, or there before: a row exists.
            KeyState::Unknown => Err(KeyError::Corrupt(customer.clone())),
        }
    }

    /// A customer's key.
    pub async fn key(&self, customer: &CustomerId) -> Result<KeyState, KeyError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT data_key, erased_at FROM customer_keys WHERE customer_id = $1",
                &[customer.as_str().into()],
            )
            .await?;
        state_of(customer, row.as_ref())
    }

    /// The keys of several customers, in one read per 500.
    pub async fn keys(
        &self,
        customers: &[CustomerId],
    ) -> Result<HashMap<CustomerId, KeyState>, KeyError> {
        let mut ids: Vec<String> = customers.iter().map(|id| id.to_string()).collect();
        ids.sort();
        ids.dedup();
        let mut tx = self.db.begin().await?;
        let rows = fetch_for_keys(
            &mut tx,
            "SELECT customer_id, data_key, erased_at FROM customer_keys WHERE customer_id {keys}",
            &[],
            &ids,
        )
        .await?;
        tx.commit().await?;
        let mut found = HashMap::with_capacity(customers.len());
        for row in &rows {
            let Ok(customer) = CustomerId::parse(&row.text("customer_id")) else {
                continue;
            };
            let state = state_of(&customer, Some(row))?;
            found.insert(customer, state);
        }
        for customer in customers {
            found.entry(customer.clone()).or_insert(KeyState::Unknown);
        }
        Ok(found)
    }

    /// Erases a customer's key: the key's bytes leave the table (zeroed in SQLite's pages),
    /// the row stays as a tombstone, and then the store's own copies of the old row are
    /// purged (see [`Erasure::purged`]). Erasing again changes nothing and reports the first
    /// erasure. A customer with no key gets a tombstone, so none is made for them later.
    pub async fn erase(&self, customer: &CustomerId) -> Result<Erasure, KeyError> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO customer_keys (customer_id, data_key, created_at, erased_at)
             VALUES ($1, NULL, $2, $2)
             ON CONFLICT (customer_id) DO UPDATE SET data_key = NULL,
                 erased_at = COALESCE(customer_keys.erased_at, excluded.erased_at)",
            &[customer.as_str().into(), now.into()],
        )
        .await?;
        let erased_at = tx
            .fetch_optional(
                "SELECT erased_at FROM customer_keys WHERE customer_id = $1",
                &[customer.as_str().into()],
            )
            .await?
            .map_or(now, |row| row.int("erased_at"));
        tx.commit().await?;
        let purged = self.purge().await;
        Ok(Erasure {
            erased_at,
            first: erased_at == now,
            purged,
        })
    }

    /// Removes the store's own copies of overwritten rows; false when it could not (yet).
    async fn purge(&self) -> bool {
        let done = if self.db.is_postgres() {
            // VACUUM runs outside any transaction block, as a simple query.
            self.db
                .run_alone("VACUUM customer_keys")
                .await
                .map(|()| true)
        } else {
            self.db.truncate_wal().await
        };
        done.unwrap_or_else(|error| {
            tracing::warn!(%error, "the key store could not purge an erased key's old copies yet");
            false
        })
    }
}

fn state_of(customer: &CustomerId, row: Option<&sql_store::Row>) -> Result<KeyState, KeyError> {
    let Some(row) = row else {
        return Ok(KeyState::Unknown);
    };
    if let Value::Int(at) = row.get("erased_at") {
        return Ok(KeyState::Erased { at: *at });
    }
    match row.get("data_key").text().and_then(DataKey::from_stored) {
        Some(key) => Ok(KeyState::Live(key)),
        None => Err(KeyError::Corrupt(customer.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: &str) -> CustomerId {
        CustomerId::parse(id).unwrap()
    }

    async fn store(dir: &tempfile::TempDir) -> KeyStore {
        let db = Db::sqlite_secure(&dir.path().join("keys.db"))
            .await
            .unwrap();
        KeyStore::open(db).await.unwrap()
    }

    #[test]
    fn a_sealed_field_opens_only_as_the_field_of_the_customer_it_was_sealed_for() {
        let key = KeyState::Live(DataKey::generate());
        let KeyState::Live(data_key) = &key else {
            unreachable!()
        };
        let alice = customer("alice");
        let sealed = seal(data_key, &alice, "email", "alice@example.com");
        assert!(!sealed.as_str().contains("alice"));
        assert_eq!(
            open(&key, &alice, "email", &sealed),
            Opened::Text("alice@example.com".into())
        );
        assert_eq!(open(&key, &alice, "name", &sealed), Opened::Unreadable);
        assert_eq!(
            open(&key, &customer("bob"), "email", &sealed),
            Opened::Unreadable
        );
        let other = KeyState::Live(DataKey::generate());
        assert_eq!(open(&other, &alice, "email", &sealed), Opened::Unreadable);
        assert_eq!(
            open(&KeyState::Erased { at: 1 }, &alice, "email", &sealed),
            Opened::Erased
        );
        // The same text seals differently each time.
        assert_ne!(seal(data_key, &alice, "email", "alice@example.com"), sealed);
    }

    #[tokio::test]
    async fn a_registration_key_is_made_once_and_never_again_after_erasure() {
        let dir = tempfile::tempdir().unwrap();
        let keys = store(&dir).await;
        let alice = customer("alice");
        let first = keys.key_for_registration(&alice).await.unwrap();
        let again = keys.key_for_registration(&alice).await.unwrap();
        assert_eq!(first.0, again.0);
        let sealed = seal(&first, &alice, "name", "Alice Liddell");
        let live = keys.key(&alice).await.unwrap();
        assert_eq!(
            open(&live, &alice, "name", &sealed).text(),
            Some("Alice Liddell")
        );

        let erasure = keys.erase(&alice).await.unwrap();
        assert!(erasure.first);
        assert!(erasure.purged, "nothing else reads: the WAL is truncated");
        assert_eq!(
            open(&keys.key(&alice).await.unwrap(), &alice, "name", &sealed),
            Opened::Erased
        );
        assert!(matches!(
            keys.key_for_registration(&alice).await,
            Err(KeyError::Erased(_))
        ));
        let repeat = keys.erase(&alice).await.unwrap();
        assert!(!repeat.first);
        assert_eq!(repeat.erased_at, erasure.erased_at);

        // Unknown customers read as such; erasing one leaves a tombstone.
        let bob = customer("bob");
        let found = keys.keys(&[alice.clone(), bob.clone()]).await.unwrap();
        assert!(matches!(found[&alice], KeyState::Erased { .. }));
        assert!(matches!(found[&bob], KeyState::Unknown));
        keys.erase(&bob).await.unwrap();
        assert!(keys.key_for_registration(&bob).await.is_err());
    }

    /// On Postgres (when `TEST_DATABASE_URL` names one): the same rules, and the erased row's
    /// old version vacuumed.
    #[tokio::test]
    async fn on_postgres_an_erasure_vacuums_the_old_key() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            assert!(
                std::env::var("TEST_REQUIRE_BACKENDS").is_err(),
                "TEST_REQUIRE_BACKENDS=1 but TEST_DATABASE_URL is not set"
            );
            return;
        };
        let schema = format!("keys_test_{}", std::process::id());
        let db = Db::postgres(&url, &schema, 2).await.unwrap();
        let keys = KeyStore::open(db.clone()).await.unwrap();
        let alice = customer("alice");
        let key = keys.key_for_registration(&alice).await.unwrap();
        let sealed = seal(&key, &alice, "email", "alice@example.com");
        let erasure = keys.erase(&alice).await.unwrap();
        assert!(erasure.first);
        assert!(erasure.purged, "VACUUM ran");
        assert_eq!(
            open(&keys.key(&alice).await.unwrap(), &alice, "email", &sealed),
            Opened::Erased
        );
        assert!(keys.key_for_registration(&alice).await.is_err());
        db.execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"), &[])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_erased_key_leaves_no_copy_in_the_store_files() {
        let dir = tempfile::tempdir().unwrap();
        let keys = store(&dir).await;
        let alice = customer("alice");
        let key = keys.key_for_registration(&alice).await.unwrap();
        let stored = key.to_stored();
        let files = || -> Vec<u8> {
            let mut all = Vec::new();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                all.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            all
        };
        let contains = |haystack: &[u8]| {
            haystack
                .windows(stored.len())
                .any(|window| window == stored.as_bytes())
        };
        assert!(contains(&files()), "the key is stored before erasure");
        assert!(keys.erase(&alice).await.unwrap().purged);
        assert!(!contains(&files()), "no file holds the erased key");
    }
}
