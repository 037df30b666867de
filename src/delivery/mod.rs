//! Calling the users' HTTP APIs for matching changes (on_change rules).
//!
//! [`Request`] turns a rule's compiled request ([`Template`], from
//! [`crate::rules::on_change`]) and a change into one signed, credentialed
//! HTTP request; [`Sender`] sends it once and says what happened in words
//! safe to log; [`Delivery`] is the one path every request takes (the
//! rule's rate, the endpoint's circuit and share, the metrics);
//! [`dead_letter`] keeps what still failed after the last retry. Ordering,
//! debounce, retries and attempts are the caller's.
//!
//! [`Template`]: crate::rules::on_change::Template

pub(crate) mod circuit;
pub mod dead_letter;
pub(crate) mod request;
pub(crate) mod send;
mod service;

pub(crate) use request::Request;
pub(crate) use request::RequestError;
pub(crate) use send::DeliveryError;
pub use send::{Delivered, Sender};
pub use service::{Delivery, Outcome};
