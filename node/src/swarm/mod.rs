//! The swarm's pure state machines: origin admission on the seed, the download scheduler and
//! the bandwidth token bucket. No sockets, no clocks of their own: callers pass `now`, so the
//! same code runs in the services, in unit tests and in the simulator.

pub mod admission;
pub mod ratelimit;
pub mod scheduler;
