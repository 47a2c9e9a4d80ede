//! Migrations when several processes start at once on a fresh database: every start succeeds,
//! each migration runs once, and the later starts find the work done. The Postgres tests run
//! when `TEST_DATABASE_URL` names a Postgres database (`scripts/test.sh` sets it; with
//! `TEST_REQUIRE_BACKENDS=1` its absence fails instead of skipping).

use std::sync::LazyLock;

use sql_store::{Db, Migrations, Value, migrate};

/// Like a projection's: a table and an index, without `IF NOT EXISTS`, so a second run of it
/// would fail.
const FIRST: &str = "-- The things, by name.
CREATE TABLE things (name TEXT PRIMARY KEY, count BIGINT NOT NULL);
CREATE INDEX things_by_count ON things (count)";
const SECOND: &str = "-- When each thing last changed.
ALTER TABLE things ADD COLUMN changed_at BIGINT";
const OTHER: &str = "-- Another owner's table in the same schema.
CREATE TABLE other_things (id BIGINT PRIMARY KEY)";

/// Two owners of tables in one schema, as the projection runtime and a read model are.
static THINGS: LazyLock<Migrations> = LazyLock::new(|| {
    Migrations::new(
        "things",
        &[("1_things.sql", FIRST), ("2_changed_at.sql", SECOND)],
    )
});
static OTHERS: LazyLock<Migrations> =
    LazyLock::new(|| Migrations::new("other", &[("3_other_things.sql", OTHER)]));

/// How many starts race on one schema.
const STARTS: usize = 6;

fn database_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var("TEST_REQUIRE_BACKENDS").is_ok_and(|value| value == "1") => {
            panic!("TEST_REQUIRE_BACKENDS=1 but TEST_DATABASE_URL is not set")
        }
        Err(_) => {
            eprintln!("TEST_DATABASE_URL not set: the Postgres test is skipped");
            None
        }
    }
}

fn fresh_schema(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    format!("t_{label}_{}_{nanos}", std::process::id())
}

/// What one process does at start: connect (creating the schema) and run two owners'
/// migrations, as the read side does for the runtime's tables and a projection's.
async fn start(url: String, schema: String) -> Result<Db, String> {
    let db = Db::postgres(&url, &schema, 2)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    migrate(&db, &THINGS)
        .await
        .map_err(|error| format!("migrate things: {error}"))?;
    migrate(&db, &OTHERS)
        .await
        .map_err(|error| format!("migrate other: {error}"))?;
    Ok(db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_on_a_fresh_schema_all_succeed_and_migrate_once() {
    let Some(url) = database_url() else { return };
    // A few rounds, each on its own fresh schema: one race lost is enough to fail.
    for round in 0..3 {
        let schema = fresh_schema(&format!("migrate{round}"));
        let starts: Vec<_> = (0..STARTS)
            .map(|_| tokio::spawn(start(url.clone(), schema.clone())))
            .collect();
        let mut dbs = Vec::new();
        for (index, started) in starts.into_iter().enumerate() {
            match started.await.expect("the start task") {
                Ok(db) => dbs.push(db),
                Err(error) => panic!("start {index} of {STARTS} on {schema} failed: {error}"),
            }
        }
        let db = &dbs[0];
        assert_eq!(
            applied(db).await,
            applied_once(),
            "each migration of {schema} is recorded once"
        );
        // The migrated tables are there, in the schema, with the second migration's column.
        db.execute(
            "INSERT INTO things (name, count, changed_at) VALUES ($1, $2, $3)",
            &[Value::from("a"), Value::from(1_i64), Value::from(2_i64)],
        )
        .await
        .expect("insert into the migrated table");
        // A later start finds everything done and changes nothing.
        start(url.clone(), schema.clone())
            .await
            .unwrap_or_else(|error| panic!("a later start on {schema} failed: {error}"));
        for db in dbs {
            if let Db::Postgres(pool) = db {
                pool.close().await;
            }
        }
        drop_schema(&url, &schema).await;
    }
}

/// Each recorded migration, and how many times it is recorded.
async fn applied(db: &Db) -> Vec<(i64, i64)> {
    db.fetch_all(
        "SELECT version, COUNT(*) AS times FROM _sqlx_migrations GROUP BY version ORDER BY version",
        &[],
    )
    .await
    .expect("read _sqlx_migrations")
    .iter()
    .map(|row| (row.int("version"), row.int("times")))
    .collect()
}

fn applied_once() -> Vec<(i64, i64)> {
    vec![(1, 1), (2, 1), (3, 1)]
}

/// The schema exists (an earlier start, or an operator, created it) and has no tables yet:
/// the migrations themselves race, with `CREATE TABLE IF NOT EXISTS _sqlx_migrations` first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_an_empty_schema_all_succeed_and_run_once() {
    let Some(url) = database_url() else { return };
    for round in 0..3 {
        let schema = fresh_schema(&format!("empty{round}"));
        let created = Db::postgres(&url, &schema, 1)
            .await
            .expect("create the schema");
        let mut dbs = Vec::new();
        for _ in 0..STARTS {
            dbs.push(Db::postgres(&url, &schema, 2).await.expect("connect"));
        }
        let migrations: Vec<_> = dbs
            .iter()
            .cloned()
            .map(|db| {
                tokio::spawn(async move {
                    migrate(&db, &THINGS).await?;
                    migrate(&db, &OTHERS).await
                })
            })
            .collect();
        for (index, migration) in migrations.into_iter().enumerate() {
            if let Err(error) = migration.await.expect("the migration task") {
                panic!("migration {index} of {STARTS} on {schema} failed: {error}");
            }
        }
        assert_eq!(
            applied(&created).await,
            applied_once(),
            "each migration of {schema} is recorded once"
        );
        for db in dbs.into_iter().chain([created]) {
            if let Db::Postgres(pool) = db {
                pool.close().await;
            }
        }
        drop_schema(&url, &schema).await;
    }
}

/// SQLite needs no lock of its own: a migration's transaction holds the file's write lock
/// from `BEGIN IMMEDIATE`, and the others wait for it (the busy timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_on_a_fresh_sqlite_file_all_succeed_and_migrate_once() {
    let dir = std::env::temp_dir().join(fresh_schema("sqlite"));
    let path = dir.join("store.db");
    let starts: Vec<_> = (0..STARTS)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let db = Db::sqlite(&path).await?;
                migrate(&db, &THINGS).await?;
                migrate(&db, &OTHERS).await?;
                Ok::<_, sql_store::DbError>(db)
            })
        })
        .collect();
    let mut dbs = Vec::new();
    for (index, started) in starts.into_iter().enumerate() {
        match started.await.expect("the start task") {
            Ok(db) => dbs.push(db),
            Err(error) => panic!(
                "start {index} of {STARTS} on {} failed: {error}",
                path.display()
            ),
        }
    }
    assert_eq!(applied(&dbs[0]).await, applied_once());
    for db in dbs {
        if let Db::Sqlite(pool) = db {
            pool.close().await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database whose first migration the platform's earlier runner recorded (in
/// `schema_migrations`, by owner and ordinal): that migration is recorded as run and not run
/// again (its `CREATE TABLE` would fail), the second one runs, and a later start changes nothing.
async fn earlier_records_are_adopted(db: &Db) {
    db.execute(
        "CREATE TABLE schema_migrations (
            projection TEXT NOT NULL, version BIGINT NOT NULL, applied_at BIGINT NOT NULL,
            PRIMARY KEY (projection, version))",
        &[],
    )
    .await
    .expect("the earlier runner's table");
    for statement in FIRST.split(';') {
        db.execute(statement, &[])
            .await
            .expect("the first migration, as the earlier runner ran it");
    }
    db.execute(
        "INSERT INTO schema_migrations (projection, version, applied_at) VALUES ('things', 1, 0)",
        &[],
    )
    .await
    .expect("its record");
    migrate(db, &THINGS)
        .await
        .expect("migrate a database the earlier runner made");
    migrate(db, &THINGS).await.expect("a later start");
    assert_eq!(applied(db).await, vec![(1, 1), (2, 1)]);
    db.execute(
        "INSERT INTO things (name, count, changed_at) VALUES ('a', 1, 2)",
        &[],
    )
    .await
    .expect("the second migration's column is there");
}

/// A migration edited after it ran is refused at start (its checksum differs), not run again.
async fn an_edited_migration_is_refused(db: &Db) {
    migrate(db, &THINGS).await.expect("migrate");
    let edited = Migrations::new(
        "things",
        &[(
            "1_things.sql",
            "CREATE TABLE things (name TEXT PRIMARY KEY)",
        )],
    );
    let error = migrate(db, &edited)
        .await
        .expect_err("an edited migration must be refused");
    assert!(
        error.to_string().contains("modified"),
        "the error says the migration was modified: {error}"
    );
}

#[tokio::test]
async fn a_sqlite_file_migrated_by_the_earlier_runner_is_adopted() {
    let dir = std::env::temp_dir().join(fresh_schema("sqlite_earlier"));
    let db = Db::sqlite(&dir.join("store.db")).await.expect("open");
    earlier_records_are_adopted(&db).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_postgres_schema_migrated_by_the_earlier_runner_is_adopted() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema("earlier");
    let db = Db::postgres(&url, &schema, 2).await.expect("connect");
    earlier_records_are_adopted(&db).await;
    drop_schema(&url, &schema).await;
}

#[tokio::test]
async fn an_edited_migration_is_refused_on_both_databases() {
    let dir = std::env::temp_dir().join(fresh_schema("sqlite_edited"));
    let db = Db::sqlite(&dir.join("store.db")).await.expect("open");
    an_edited_migration_is_refused(&db).await;
    let _ = std::fs::remove_dir_all(&dir);
    let Some(url) = database_url() else { return };
    let schema = fresh_schema("edited");
    let db = Db::postgres(&url, &schema, 2).await.expect("connect");
    an_edited_migration_is_refused(&db).await;
    drop_schema(&url, &schema).await;
}

async fn drop_schema(url: &str, schema: &str) {
    let db = Db::postgres(url, schema, 1).await.expect("connect to drop");
    db.execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"), &[])
        .await
        .expect("drop the test schema");
    if let Db::Postgres(pool) = db {
        pool.close().await;
    }
}
