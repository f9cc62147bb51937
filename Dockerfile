# session-router container image.
#
#   docker build -t session-router .
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT_ID/REPOSITORY/session-router:VERSION .
#
# Two stages: a Rust toolchain builds the release binary, and the binary alone
# is copied onto distroless "cc" (glibc + libgcc, CA certificates, tzdata, a
# nonroot user; no shell, no package manager). Expected size: about 45 MB
# uncompressed (the base about 23 MB as published, the binary 20.7 MB as
# measured), about 20 MB compressed in the registry. See DEPLOY.md.
#
# Base images are pinned by exact tag: the builder by its full Rust version
# (the toolchain that CI and developers use), the runtime by its Debian
# release, which must match the builder's (bookworm = Debian 12) so that the
# glibc the binary was linked against is the one it runs on. Distroless
# publishes no versioned tags, only digests; to pin fully, append the digest
# you have reviewed, e.g. `gcr.io/distroless/cc-debian12:nonroot@sha256:...`
# (`docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot`).
#
# Nothing secret is built in: the cookie key arrives at run time through the
# SESSION_ROUTER_COOKIE_SECRET environment variable (a Kubernetes Secret), the
# config through a mounted ConfigMap.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /build

# 1. Dependencies only, in their own layer: cached until Cargo.toml or
#    Cargo.lock change. Every target the manifest names gets a stub source so
#    that Cargo accepts the manifest; the stubs are thrown away afterwards.
COPY Cargo.toml Cargo.lock ./
RUN grep -E '^path *= *"' Cargo.toml | cut -d'"' -f2 | while read -r target; do \
        mkdir -p "$(dirname "$target")" && echo 'fn main() {}' > "$target"; \
    done \
 && cargo build --release --locked \
 && cargo clean --release --package session-router \
 && rm -rf src benches

# 2. The real sources. The build command is exactly the native one:
#    `cargo build --release --locked` (what tests/manifests.rs expects here),
#    and so is the binary: the release profile leaves the debug info out
#    (Cargo.toml), so the image ships what a native build measures.
COPY . .
RUN cargo build --release --locked \
 && ./target/release/session-router --version | grep -q '^session-router ' 

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /build/target/release/session-router /usr/local/bin/session-router
# distroless' "nonroot" user (uid and gid 65532), named by number so that
# Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/session-router", "serve", "--config", "/etc/session-router/config.toml"]
