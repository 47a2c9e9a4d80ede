# syntax=docker/dockerfile:1
# One image for every part of the platform: `platform serve <part>` picks the part.
#
#   docker build -t fulfilment-platform .
#   docker run --rm fulfilment-platform --help
#
# Stage 1 compiles the `platform` binary (librdkafka is built from source by rdkafka-sys, which
# needs only the C toolchain of the Rust image). Stage 2 is a slim Debian with the binary, curl
# for the container healthchecks, and a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and the compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin platform \
    && cp target/release/platform /usr/local/bin/platform

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/platform --create-home platform
COPY --from=build /usr/local/bin/platform /usr/local/bin/platform
USER 10001
WORKDIR /var/lib/platform
ENV PLATFORM_HTTP_ADDR=0.0.0.0:8080 \
    PLATFORM_DATA_DIR=/var/lib/platform/data \
    PLATFORM_LOG_JSON=true
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=5 \
    CMD curl -fsS http://127.0.0.1:8080/health/live || exit 1
ENTRYPOINT ["/usr/local/bin/platform"]
CMD ["serve"]
