//! Why the platform could not start, serve, or finish an operator command. Each variant keeps
//! the error it comes from as its source and says what was being done; the binary prints the
//! chain.

use std::path::PathBuf;

/// Why the platform could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings that cannot work together, or a request a tool cannot carry out, in words that
    /// say what to change.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Security(#[from] http_edge::security::InvalidSettings),
    /// Another process serves the embedded data directory.
    #[error(
        "the data directory {} is in use by {holder}: one process serves a data directory at a \
         time; stop it, or give this one another --data-dir",
        dir.display()
    )]
    DataDirInUse { dir: PathBuf, holder: String },
    /// A file, a directory or a socket could not be made, opened or written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The event log refused what `what` needed.
    #[error("{what}: {source}")]
    Log {
        what: String,
        #[source]
        source: event_log::LogError,
    },
    /// A database (read models, the saga's) refused what `what` needed.
    #[error("{what}: {source}")]
    Db {
        what: String,
        #[source]
        source: projections::db::DbError,
    },
    #[error(transparent)]
    Store(#[from] command_services::store::StoreError),
    #[error("starting the command services: {0}")]
    Commands(#[from] command_services::services::StartError),
    #[error("replaying {projection}: {source}")]
    Replay {
        projection: String,
        #[source]
        source: projections::replay::ReplayError,
    },
    #[error(transparent)]
    Status(#[from] projections::read_side::StatusError),
    #[error(transparent)]
    Parked(#[from] projections::parked::ResolveError),
    /// A report could not be written as JSON.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Audit(#[from] projections::audit::AuditError),
    #[error(transparent)]
    Gateway(#[from] gateway::Error),
    /// The OTLP exporter could not be built.
    #[error("OTLP trace exporter for {url}: {source}")]
    Otlp {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// For `map_err`: an I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// For `map_err`: a log error while doing `what`.
    pub fn log(what: impl Into<String>) -> impl FnOnce(event_log::LogError) -> Error {
        let what = what.into();
        move |source| Error::Log { what, source }
    }

    /// For `map_err`: a database error while doing `what`.
    pub fn db(what: impl Into<String>) -> impl FnOnce(projections::db::DbError) -> Error {
        let what = what.into();
        move |source| Error::Db { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
