//! The contract between the XDP program and the userspace controller.
//!
//! Everything both sides must agree on lives here: the `#[repr(C)]` map types, the map
//! names and layouts (one table, [`MAPS`]), the Call-ID locator and the keyed hash. The
//! eBPF crate and the controller call the very same functions, so the kernel and the slow
//! path can never disagree on which backend a message belongs to.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate std;

#[cfg(feature = "user")]
pub mod addr;
pub mod affinity;
pub mod census;
pub mod csum;
pub mod hash;
#[cfg(feature = "user")]
pub mod health;
#[cfg(feature = "user")]
pub mod load;
pub mod map_specs;
pub mod maps;
pub mod parse;
#[cfg(feature = "user")]
pub mod sip;
#[cfg(feature = "user")]
pub mod table;
#[cfg(test)]
mod test_rng;

pub use hash::{CallIdHasher, HashKey};
pub use map_specs::{ALL_MAPS, Entries, InnerMap, MAPS, MapKind, MapSpec, map_spec};
pub use maps::*;
pub use parse::{Scan, ScanOutcome, Scanner, scan_call_id};
