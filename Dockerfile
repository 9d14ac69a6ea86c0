# berth from source, for machines with internet access:
#   docker build -t berth:local .
# (Offline, docker/build-images.sh builds the same image from a host binary.)
FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq libclang-dev protobuf-compiler >/dev/null
WORKDIR /src
COPY . .
RUN cargo build --release --bin berth && cp target/release/berth /berth

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin berth \
    && mkdir -p /data /etc/berth && chown berth /data
COPY --from=build /berth /usr/local/bin/berth
USER berth
VOLUME /data
EXPOSE 5000 5001
ENV BERTH_DATA_DIR=/data
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=3 CMD ["berth", "ping", "--http", "127.0.0.1:5000"]
ENTRYPOINT ["berth"]
CMD ["serve", "--http", "0.0.0.0:5000", "--grpc", "0.0.0.0:5001"]
