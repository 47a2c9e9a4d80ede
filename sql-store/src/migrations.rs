//! Schema migrations: each owner of tables keeps its SQL in `.sql` files named
//! `<version>_<description>.sql` in its crate's `migrations/<owner>/`, embedded in the binary by
//! [`migrations!`](crate::migrations!), and run by sqlx's migrator, which records them in
//! `_sqlx_migrations` with their checksums (an edited migration is refused at start, not run).
//!
//! Several owners share one schema (the projection runtime and each read model; the saga), so
//! versions are unique across owners (timestamps, as sqlx names them) and each owner's
//! migrator ignores the versions of the others.
//!
//! Several processes may start at once on one database: [`migrate`] runs in one transaction
//! that first takes the schema's lock (on Postgres the advisory lock [`Db::postgres`] creates
//! the schema under; on SQLite the write lock, by `BEGIN IMMEDIATE`), so one process migrates
//! while the others wait, then find the migrations recorded and run none. A migration that
//! fails rolls back with everything before it in the same start.

use std::borrow::Cow;

use sqlx::migrate::{Migrate, MigrateError, Migration, MigrationType, Migrator};

use crate::{Db, DbError, LOCK_SCHEMA, SCHEMA_LOCK_CLASS, Tx};

/// One owner's migrations, in order.
#[derive(Debug)]
pub struct Migrations {
    owner: &'static str,
    migrator: Migrator,
}

/// Embeds an owner's migration files: `migrations!("orders", "../migrations/orders/…sql", …)`,
/// paths relative to the invoking file.
#[macro_export]
macro_rules! migrations {
    ($owner:expr, $($file:literal),+ $(,)?) => {
        $crate::Migrations::new($owner, &[$(($file, include_str!($file))),+])
    };
}

impl Migrations {
    /// `files` are `(path, SQL)` in order; each file's name is `<version>_<description>.sql`.
    ///
    /// # Panics
    /// On a file name without a version, or versions out of order: the files are part of the
    /// binary, so this is a mistake in the code, found by any test that starts the owner.
    pub fn new(owner: &'static str, files: &[(&'static str, &'static str)]) -> Migrations {
        let mut migrations: Vec<Migration> = Vec::with_capacity(files.len());
        for (path, sql) in files {
            let name = path.rsplit('/').next().unwrap_or(path);
            let stem = name.strip_suffix(".sql").unwrap_or(name);
            let (version, description) = stem.split_once('_').unwrap_or((stem, ""));
            let version: i64 = version.parse().unwrap_or_else(|_| {
                panic!("migration {path} of {owner}: the name must start with <version>_")
            });
            if let Some(last) = migrations.last() {
                assert!(
                    version > last.version,
                    "migration {path} of {owner}: version {version} is not after {}",
                    last.version
                );
            }
            migrations.push(Migration::new(
                version,
                Cow::Owned(description.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            ));
        }
        let mut migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        // Other owners' versions in the same schema are theirs, not missing files; the lock is
        // the transaction's (see the module's documentation).
        migrator.set_ignore_missing(true);
        migrator.set_locking(false);
        Migrations { owner, migrator }
    }

    /// The owner, as the migrations' records name it.
    pub fn owner(&self) -> &'static str {
        self.owner
    }

    /// For a database this owner has to itself (the embedded log's file): a version recorded
    /// there that these migrations do not know (a newer binary's) is refused at start, not
    /// ignored.
    pub fn alone(mut self) -> Migrations {
        self.migrator.set_ignore_missing(false);
        self
    }

    /// sqlx's migrator of them, for a file that [`migrate`] does not open (the embedded log's).
    pub fn migrator(&self) -> &Migrator {
        &self.migrator
    }

    /// The versions, in order.
    pub fn versions(&self) -> impl Iterator<Item = i64> + '_ {
        self.migrator.iter().map(|migration| migration.version)
    }

    /// The migrations that a record of the platform's own earlier runner (table
    /// `schema_migrations`: owner and 1-based ordinal) says have run.
    fn recorded_as<'a>(&'a self, ordinals: &'a [i64]) -> impl Iterator<Item = &'a Migration> {
        self.migrator
            .iter()
            .enumerate()
            .filter_map(|(index, migration)| {
                ordinals.contains(&(index as i64 + 1)).then_some(migration)
            })
    }
}

fn migrate_error(error: MigrateError) -> DbError {
    DbError::from(sqlx::Error::Migrate(Box::new(error)))
}

/// Runs the migrations of `migrations`' owner that have not run yet, in order, each once, in one
/// transaction under the schema's lock (see the module's documentation).
///
/// A database whose tables were made by the platform's earlier migration runner records them in
/// `schema_migrations` (owner, ordinal); those are recorded as run here first, so they are not
/// run again. That table is left as it is.
pub async fn migrate(db: &Db, migrations: &Migrations) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    match &mut tx {
        Tx::Postgres(pg) => {
            // Locked before anything is read: under READ COMMITTED each later statement sees
            // what the previous holder committed.
            sqlx::query(LOCK_SCHEMA)
                .bind(SCHEMA_LOCK_CLASS)
                .bind(None::<&str>)
                .execute(&mut **pg)
                .await?;
            pg.ensure_migrations_table().await.map_err(migrate_error)?;
            let earlier: bool =
                sqlx::query_scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
                    .fetch_one(&mut **pg)
                    .await?;
            if earlier {
                let ordinals: Vec<i64> = sqlx::query_scalar(
                    "SELECT version FROM schema_migrations WHERE projection = $1",
                )
                .bind(migrations.owner)
                .fetch_all(&mut **pg)
                .await?;
                for migration in migrations.recorded_as(&ordinals) {
                    sqlx::query(
                        "INSERT INTO _sqlx_migrations
                             (version, description, success, checksum, execution_time)
                         VALUES ($1, $2, TRUE, $3, -1) ON CONFLICT (version) DO NOTHING",
                    )
                    .bind(migration.version)
                    .bind(&*migration.description)
                    .bind(&*migration.checksum)
                    .execute(&mut **pg)
                    .await?;
                }
            }
            migrations
                .migrator
                .run_direct(&mut **pg)
                .await
                .map_err(migrate_error)?;
        }
        // `BEGIN IMMEDIATE` (see `Db::begin`) holds the file's write lock from here.
        Tx::Sqlite(lite, _) => {
            lite.ensure_migrations_table()
                .await
                .map_err(migrate_error)?;
            let earlier: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_master
                 WHERE type = 'table' AND name = 'schema_migrations'",
            )
            .fetch_one(&mut **lite)
            .await?;
            if earlier > 0 {
                let ordinals: Vec<i64> = sqlx::query_scalar(
                    "SELECT version FROM schema_migrations WHERE projection = ?1",
                )
                .bind(migrations.owner)
                .fetch_all(&mut **lite)
                .await?;
                for migration in migrations.recorded_as(&ordinals) {
                    sqlx::query(
                        "INSERT INTO _sqlx_migrations
                             (version, description, success, checksum, execution_time)
                         VALUES (?1, ?2, TRUE, ?3, -1) ON CONFLICT (version) DO NOTHING",
                    )
                    .bind(migration.version)
                    .bind(&*migration.description)
                    .bind(&*migration.checksum)
                    .execute(&mut **lite)
                    .await?;
                }
            }
            migrations
                .migrator
                .run_direct(&mut **lite)
                .await
                .map_err(migrate_error)?;
        }
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_versions_and_descriptions() {
        let migrations = Migrations::new(
            "things",
            &[
                ("../migrations/things/20261207000001_things.sql", "SELECT 1"),
                ("20261207000002_things_by_count.sql", "SELECT 2"),
            ],
        );
        assert_eq!(
            migrations.versions().collect::<Vec<_>>(),
            [20261207000001, 20261207000002]
        );
        let descriptions: Vec<_> = migrations
            .migrator
            .iter()
            .map(|migration| migration.description.to_string())
            .collect();
        assert_eq!(descriptions, ["things", "things by count"]);
        let recorded: Vec<_> = migrations.recorded_as(&[2]).map(|m| m.version).collect();
        assert_eq!(recorded, [20261207000002]);
    }

    #[test]
    #[should_panic(expected = "is not after")]
    fn versions_out_of_order_are_refused() {
        Migrations::new(
            "things",
            &[("2_b.sql", "SELECT 1"), ("1_a.sql", "SELECT 1")],
        );
    }
}
