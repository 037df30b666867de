//! The one-shot commands, as opposed to the worker roles ([`crate::roles`]):
//!
//! - [`install`]: `install` and `uninstall`, which prepare a CouchDB server
//!   for Spiegel and clean it up again.
//! - [`status`]: `spiegel status`, which reads what the workers report.
//! - [`redeliver`]: `spiegel redeliver`, which sends dead letters again.
//! - [`update_listener`]: Spiegel 1.2's update-listener, now a stub that idles.

pub mod install;
pub mod redeliver;
pub mod status;
pub mod update_listener;
