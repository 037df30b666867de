//! Calling the users' HTTP APIs for matching changes (on_change rules).
//!
//! [`Request`] turns a rule and a change into one signed, credentialed
//! request (templating and the signature are documented in [`request`]);
//! [`Sender`] sends it once and says what happened in words safe to
//! log; [`dead_letter`] keeps what still failed after the last retry.
//! Ordering, debounce and retries are the caller's.

pub mod dead_letter;
pub mod request;
pub mod send;

pub use request::{ChangeContext, Method, Request, RequestError, RequestTemplate, Signing};
pub use send::{Delivered, DeliveryError, Sender};
