# Multi-stage build of the tollgate release binaries with the example config.
#   docker build -t tollgate .
#   docker run -p 8080:8080 -e TOLLGATE_OPENAI_KEY=... -e TOLLGATE_ANTHROPIC_KEY=... tollgate
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/tollgate --create-home tollgate
COPY --from=build /src/target/release/tollgate /src/target/release/tollgate-mock /usr/local/bin/
COPY config /etc/tollgate
USER tollgate
WORKDIR /var/lib/tollgate
EXPOSE 8080
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml", "--listen", "0.0.0.0:8080", "--log-format", "json"]
