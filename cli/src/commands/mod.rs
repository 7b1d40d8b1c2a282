//! One module per command group; each exposes its clap arguments and a `run` function.

pub mod blob;
pub mod demo;
pub mod manifest;
pub mod platform;
