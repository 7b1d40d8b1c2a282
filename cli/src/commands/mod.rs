//! One module per command group; each exposes its clap arguments and a `run` function.

pub mod blob;
pub mod ca;
pub mod cache;
pub mod demo;
pub mod deploy;
pub mod fetch;
pub mod fleet;
pub mod install;
pub mod local;
pub mod manifest;
pub mod node;
pub mod package;
pub mod platform;
pub mod seed;
