# The example missions service (examples/service.rs).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --features cache-runtime/http --example service

FROM debian:bookworm-slim
COPY --from=build /src/target/release/examples/service /usr/local/bin/service
EXPOSE 8000
CMD ["service"]
