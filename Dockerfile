# Switchboard container image: one node (the same binary runs alone or in a
# cluster). Build from the repository root:
#
#     docker build -t switchboard .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
# Operator guide: docs/DEPLOY.md.

# ---- build stage: the README's release build --------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The exact command the README uses (deploy/validate.sh checks it). The target
# directory is a cache mount, so the binary is copied out in the same step,
# then stripped (the release profile keeps line tables for backtraces; the
# image does not need them).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p switchboard \
    && install -D -m 0755 target/release/switchboard /out/switchboard \
    && strip --strip-all /out/switchboard

# ---- runtime stage ------------------------------------------------------------
FROM debian:bookworm-slim
# curl is here for the health check only: the binary has no health subcommand.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin switchboard
COPY --from=build /out/switchboard /usr/local/bin/switchboard

# A numeric user, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# Listen on every interface of the container. Set SWITCHBOARD_PUBLIC_IP (or
# --public-ip) to the address browsers reach: it is what ICE advertises, and
# 0.0.0.0 is not reachable.
ENV SWITCHBOARD_BIND=0.0.0.0

# 3000/tcp HTTP(S): page, /ws signaling, /healthz, /readyz, /metrics, /api/status
# 3001/udp media (WebRTC); 3001/tcp media over ICE-TCP for browsers without UDP
# 3002/udp trunk (QUIC between the nodes of a cluster)
EXPOSE 3000/tcp 3001/udp 3001/tcp 3002/udp

# /healthz answers 200 while the process runs. Plain HTTP first; with
# --tls-cert the same port speaks HTTPS (self-signed certs accepted: this is a
# liveness check, not a trust check). Follows SWITCHBOARD_HTTP_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${SWITCHBOARD_HTTP_PORT:-3000}/healthz" \
     || curl -fsSk -o /dev/null "https://127.0.0.1:${SWITCHBOARD_HTTP_PORT:-3000}/healthz" \
     || exit 1

# SIGTERM drains gracefully (participants told, trunks closed, exit 0) within
# about 15 s: give `docker stop` a longer timeout than its 10 s default
# (`docker stop -t 30`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
