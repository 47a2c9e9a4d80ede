//! Migrations when several processes start at once on a fresh database: every start succeeds,
//! each migration runs once, and the later starts find the work done. The Postgres tests run
//! when `TEST_DATABASE_URL` names a Postgres database (`scripts/test.sh` sets it; with
//! `TEST_REQUIRE_BACKENDS=1` its absence fails instead of skipping).

use sql_store::{Db, Value, migrate};

/// Like a projection's: a table and an index, without `IF NOT EXISTS`, so a second run of it
/// would fail.
const FIRST: &str = "-- The things, by name.
CREATE TABLE things (name TEXT PRIMARY KEY, count BIGINT NOT NULL);
CREATE INDEX things_by_count ON things (count)";
const SECOND: &str = "-- When each thing last changed.
ALTER TABLE things ADD COLUMN changed_at BIGINT";
const OTHER: &str = "-- Another owner's table in the same schema.
CREATE TABLE other_things (id BIGINT PRIMARY KEY)";

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
    migrate(&db, "things", &[FIRST, SECOND])
        .await
        .map_err(|error| format!("migrate things: {error}"))?;
    migrate(&db, "other", &[OTHER])
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

/// Each migration of the test's owners, and how many times it is recorded.
async fn applied(db: &Db) -> Vec<(String, i64, i64)> {
    db.fetch_all(
        "SELECT projection, version, COUNT(*) AS times FROM schema_migrations
         GROUP BY projection, version ORDER BY projection, version",
        &[],
    )
    .await
    .expect("read schema_migrations")
    .iter()
    .map(|row| (row.text("projection"), row.int("version"), row.int("times")))
    .collect()
}

fn applied_once() -> Vec<(String, i64, i64)> {
    vec![
        ("other".to_owned(), 1, 1),
        ("things".to_owned(), 1, 1),
        ("things".to_owned(), 2, 1),
    ]
}

/// The schema exists (an earlier start, or an operator, created it) and has no tables yet:
/// the migrations themselves race, with `CREATE TABLE IF NOT EXISTS schema_migrations` first.
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
                    migrate(&db, "things", &[FIRST, SECOND]).await?;
                    migrate(&db, "other", &[OTHER]).await
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
                migrate(&db, "things", &[FIRST, SECOND]).await?;
                migrate(&db, "other", &[OTHER]).await?;
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

async fn drop_schema(url: &str, schema: &str) {
    let db = Db::postgres(url, schema, 1).await.expect("connect to drop");
    db.execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"), &[])
        .await
        .expect("drop the test schema");
    if let Db::Postgres(pool) = db {
        pool.close().await;
    }
}
