//! The admin HTTP server: `/healthz`, `/readyz` and Prometheus `/metrics`
//! for operators and orchestrators. Not served yet: it arrives with the
//! worker roles it reports on.
