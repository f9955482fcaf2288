# Aura in a container.
#
#   docker build -t aura .
#   docker run --rm --stop-timeout 40 -p 8080:8080 aura --demo      # built-in mock upstream, offline
#   docker run --rm --stop-timeout 40 -p 8080:8080 -e UPSTREAM_URL=https://api.openai.com/v1 aura
#
# Stopping: on SIGTERM Aura lets requests in flight finish (AURA_SHUTDOWN_GRACE_MS, 20 s by
# default), then flushes spend and exits. `docker stop` sends SIGKILL after only 10 s unless told
# otherwise: give it more than the grace (--stop-timeout, or stop_grace_period in compose), or
# lower the grace, or spend still in flight at the kill is not flushed.
#
# io_uring: Docker Engine >= 25 and containerd 2.0 refuse io_uring in their default seccomp
# profiles. Aura then runs every worker on epoll by itself (each worker logs `driver=epoll`, and
# /metrics shows aura_worker_driver{driver="epoll"}); nothing else changes. To allow io_uring is
# an operator's choice, not this image's default: run with a seccomp profile that also allows
# io_uring_setup, io_uring_enter and io_uring_register (Docker's default profile plus those
# three), or with `--security-opt seccomp=unconfined` (`security_opt: [seccomp=unconfined]` in
# compose), which drops the whole syscall filter. On kernels 5.10-5.11 the ring is also charged
# to RLIMIT_MEMLOCK: add `--ulimit memlock=-1` there.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole tree (less .dockerignore): Cargo.toml names the perf/ workspace member and the
# benches/ target, and cargo wants both present even to build only the aura binary.
COPY . .
# Cache mounts (BuildKit, Docker's default builder since 23.0) keep the crates.io downloads and
# target/ between builds. target/ is a mount, so the binary is copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin aura \
 && cp target/release/aura /usr/local/bin/aura

# ---- runtime ----------------------------------------------------------------------------------
# Same Debian release as the build stage, so the glibc the binary was linked against is there
# (it needs only libc and libgcc_s, both in slim).
FROM debian:bookworm-slim

# Aura trusts its built-in Mozilla roots (webpki-roots) for https upstreams; ca-certificates
# gives operators the system bundle to extend and pass as AURA_UPSTREAM_CA_FILE (private CAs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so orchestrators can check runAsNonRoot and volumes can be chowned
# from outside. /var/lib/aura holds the journal (Aura's default AURA_JOURNAL_DIR): created here owned
# by aura, so a named volume mounted there starts with that owner too.
RUN groupadd --system --gid 10001 aura \
 && useradd --system --uid 10001 --gid aura --home-dir /var/lib/aura --no-create-home \
        --shell /usr/sbin/nologin aura \
 && install -d -o aura -g aura -m 0750 /var/lib/aura

COPY --from=build /usr/local/bin/aura /usr/local/bin/aura

USER 10001:10001
WORKDIR /var/lib/aura

# 0.0.0.0 is Aura's default already; set here so a container is reachable from outside even if
# that default ever becomes loopback. Set the port with PORT (not --port): the healthcheck reads it.
ENV AURA_LISTEN_ADDR=0.0.0.0 \
    PORT=8080
EXPOSE 8080

# GET /healthz without curl: bash (in slim already) opens the TCP connection itself through
# /dev/tcp, so the image needs no extra package for its healthcheck.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8080} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r status <&3 && [[ $status == *' 200 '* ]]"]

ENTRYPOINT ["aura"]
