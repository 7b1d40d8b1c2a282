//! pkgmesh-cache: the on-disk, content-addressed chunk store every node and the seed keep.
//!
//! Owns: chunk files on disk, their index, the byte budget, eviction and pins.
//! Does not own: networking, deciding which chunks to fetch, or what a blob means to a package.
