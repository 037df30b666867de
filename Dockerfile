# syntax=docker/dockerfile:1
#
# Spiegel's container image. It is configured like Spiegel 1.2's image, by
# environment variables (TYPE, URL, PASSWORDS_FILE, LOG_LEVEL, ...; every one
# is listed in docs/configuration.md), and it has no default command:
#
#   docker build -t spiegel .
#   docker run --rm -e TYPE=install -e URL=http://admin:secret@couchdb:5984 spiegel
#   docker run -d -e TYPE=run -e URL=http://admin:secret@couchdb:5984 -p 9090:9090 spiegel
#
# Arguments after the image name go to the binary, so the subcommand style
# works too: `docker run --rm spiegel status --url http://...`.
# docs/deployment.md covers Compose, Swarm and Kubernetes.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------
# Build stage. rust:<version>-slim-bookworm has gcc and libc6-dev, which ring
# (rustls's cryptography) needs; nothing else is compiled from C.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /build

# Dependencies first, in a layer of their own: it is rebuilt only when
# Cargo.toml or Cargo.lock change, not at every change of the sources. The
# placeholder sources are just enough for cargo to build every dependency.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The crate itself, the `spiegel` binary only (not the benchmark, which
# src/bin holds). COPY keeps the files' modification times, which can be
# older than the placeholders above: touch the crate roots so that cargo
# does not take the placeholder build for up to date.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin spiegel \
 && install -D -m 0755 target/release/spiegel /out/spiegel

# ---------------------------------------------------------------------------
# Final stage: debian:bookworm-slim, the same Debian release (and glibc) as
# the build stage.
#
# Why not gcr.io/distroless/cc-debian12, which is smaller? Spiegel reads the
# CouchDB URL only from --url or the URL variable, and Docker Swarm hands
# secrets over as files (/run/secrets/...). deploy/swarm-stack.yml bridges
# the two with a one-line shell entrypoint,
#   sh -c 'URL="$(cat /run/secrets/couchdb-url)" && export URL && exec spiegel'
# and distroless has no /bin/sh. Kubernetes does not need the shell (it puts
# a secret into an environment variable itself), but one image serves both.
#
# No ca-certificates package: reqwest is built with rustls and the
# webpki-roots certificates compiled into the binary (Cargo.toml: features
# "rustls-tls"), so the system's CA store is never read. A CouchDB or API
# behind a private CA is therefore not trusted by adding it to the image.
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="spiegel" \
      org.opencontainers.image.description="Scalable replication and change listening for Apache CouchDB" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it and
# files handed to the container (passwords file, secrets) can be given to it.
RUN groupadd --system --gid 10001 spiegel \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin spiegel

COPY --from=build /out/spiegel /usr/local/bin/spiegel

USER 10001:10001

# The admin HTTP server of worker processes (run, replicator,
# change-listener): /healthz, /readyz, /metrics. --admin-addr, ADMIN_ADDR.
EXPOSE 9090

# Spiegel stops cleanly on SIGTERM (finishes its runs in flight, saves its
# checkpoints, hands its partitions over) within --shutdown-timeout, 30 s by
# default: give it longer than that, e.g. `docker stop -t 45`,
# stop_grace_period: 45s (Compose, Swarm), terminationGracePeriodSeconds: 45
# (Kubernetes). Docker's own default is 10 s.
STOPSIGNAL SIGTERM

# No HEALTHCHECK. The image has neither curl nor wget (adding one only for
# this would grow the image and what an attacker finds in it), and the same
# image runs one-shot commands (install, status, redeliver) that serve no
# admin HTTP at all, which an image-wide health check would report as
# unhealthy. Kubernetes probes /healthz and /readyz over HTTP from outside the
# container. Under Compose and Swarm the restart policy starts again a worker
# that exits; Spiegel itself retries while CouchDB is unreachable.

# No CMD: the command comes from TYPE (Spiegel 1.2 style) or from arguments.
ENTRYPOINT ["/usr/local/bin/spiegel"]
