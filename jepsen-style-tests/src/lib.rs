//! berth's Jepsen-style harness: fault injection against the docker-compose
//! cluster, recorded histories, and checkers that would catch a broken
//! promise (a stale read, a lost write, a phantom effect).

pub mod checker;
pub mod history;
pub mod report;
