# syntax=docker/dockerfile:1
#
# One image holding the three services (order-service, inventory-service, payment-service) and
# the API gateway (api-gateway).
# compose.yaml picks the binary for each container with `command`. Needs BuildKit (the default
# builder since Docker 23) for the cache mounts.
#
#   docker build -t saga-services:local .
#   docker run --rm -e HTTP_ADDR=0.0.0.0:8082 saga-services:local inventory-service

FROM rust:1-bookworm AS builder
WORKDIR /src
# No database at build time: sqlx macros, if any, use the checked-in query data.
ENV CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true
COPY . .
# The registry, git checkouts and target dir live in cache mounts that persist between builds.
# After a source change, only the workspace crates are compiled again, not the dependencies.
# The target dir is a cache mount and is gone once this step ends, so the binaries are copied
# out inside the same step.
RUN --mount=type=cache,id=saga-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=saga-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=saga-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bins \
        -p order-service -p inventory-service -p payment-service -p api-gateway \
    && mkdir -p /out \
    && cp target/release/order-service target/release/inventory-service target/release/payment-service \
        target/release/api-gateway /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS to NATS or Postgres, curl for the healthchecks. Not version-pinned: the
# security archive replaces versions, and a pin would then break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
    && mkdir -p /app/data \
    && chown app:app /app/data
COPY --from=builder /out/ /usr/local/bin/
# The services' SQLite default is sqlite://data/<service>.db, relative to this directory. compose
# uses Postgres instead.
WORKDIR /app
# Numeric, so that runtimes can check it is not root (e.g. Kubernetes runAsNonRoot).
USER 10001:10001
ENV RUST_LOG=info
EXPOSE 8080 8081 8082 8083
CMD ["order-service"]
