//! Subcommands that do more than one request: they run nodes or move data in bulk.

pub mod bulk;
pub mod local_cluster;
