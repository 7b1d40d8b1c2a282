//! The seed: catalog, publishing, origin serving with admission, tracker and audit.

pub mod audit;
pub mod catalog;
pub mod tracker;
