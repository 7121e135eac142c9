//! One module per `rein` command: its arguments and what it does.

pub(crate) mod audit;
#[cfg(feature = "demo")]
pub(crate) mod bench;
#[cfg(feature = "demo")]
pub(crate) mod bench_gateway;
pub(crate) mod check;
pub(crate) mod costs;
#[cfg(feature = "demo")]
pub(crate) mod demo;
pub(crate) mod guard;
pub(crate) mod run;
pub(crate) mod runs;
pub(crate) mod secrets;
pub(crate) mod serve;
pub(crate) mod tenants;
pub(crate) mod worker;
