//! placeholder for schema generation
