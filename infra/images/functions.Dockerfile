# syntax=docker/dockerfile:1
# The CPU functions and the tools, one image: darkroom-ingest, darkroom-preprocess,
# darkroom-notifier, darkroom (the CLI), darkroom-infra, darkroom-nats-config.
# None of them links libtorch. Build from the repository root:
#   docker build -f infra/images/functions.Dockerfile -t darkroom:0.1.0 .
# The Kubernetes manifests call it `darkroom` (infra/k8s, `command:` names the binary).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target folder between builds of the same builder.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p darkroom-ingest -p darkroom-preprocess -p darkroom-notifier \
        -p darkroom-cli -p darkroom-infra -p darkroom-nats-auth \
    && mkdir /out \
    && cp target/release/darkroom-ingest target/release/darkroom-preprocess \
          target/release/darkroom-notifier target/release/darkroom \
          target/release/darkroom-infra target/release/darkroom-nats-config /out/

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: TLS to S3 and to webhook endpoints (rustls reads the system roots).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin darkroom
COPY --from=build /out/ /usr/local/bin/
USER 10001
# No entrypoint: each Deployment names its binary (`darkroom-preprocess serve`, ...).
CMD ["darkroom", "--help"]
