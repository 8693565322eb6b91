# syntax=docker/dockerfile:1
# The GPU worker, darkroom-inference, built with `--features cuda` against libtorch from the
# PyPI wheel torch==2.11.0 (the CUDA 13.0 build, with its nvidia-* runtime wheels); the runtime
# stage keeps only libtorch's and the CUDA runtime's shared libraries. The GPU driver comes from
# the host (NVIDIA container toolkit). Build from the repository root:
#   docker build -f infra/images/inference.Dockerfile -t darkroom-inference:0.1.0-cuda .
# The Kubernetes manifests call it `darkroom-inference` (infra/k8s/base/inference.yaml).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The same pins as local-dev/requirements.txt and requirements-nodeps.txt: torch-sys 0.24
# accepts exactly libtorch 2.11.0; nvidia-cuda-crt adds the CUDA headers the wheel leaves out,
# which the CUDA-graph shim (functions/inference/csrc) is compiled against.
ENV VIRTUAL_ENV=/opt/darkroom/venv
RUN python3 -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir torch==2.11.0 \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --no-deps nvidia-cuda-crt==13.0.88 \
    && ln -s "$("$VIRTUAL_ENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')" /opt/darkroom/site-packages
ENV PATH="$VIRTUAL_ENV/bin:$PATH" \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p darkroom-inference-worker --features cuda \
    && mkdir /out \
    && cp target/release/darkroom-inference /out/

FROM debian:${DEBIAN_RELEASE}-slim
# libgomp and the CUDA libraries ship inside the wheels; libstdc++ is the system's.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin darkroom
# torch/lib and nvidia/ side by side as in the wheel: libtorch finds the CUDA libraries through
# its own relative rpath (../../nvidia/...); the binary finds libtorch and the CUDA runtime
# through LD_LIBRARY_PATH (its build-time rpath names the build stage's venv).
COPY --from=build /opt/darkroom/site-packages/torch/lib /opt/darkroom/site-packages/torch/lib
COPY --from=build /opt/darkroom/site-packages/nvidia /opt/darkroom/site-packages/nvidia
COPY --from=build /out/darkroom-inference /usr/local/bin/darkroom-inference
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/darkroom/site-packages/torch/lib:/opt/darkroom/site-packages/nvidia/cu13/lib
USER 10001
CMD ["darkroom-inference"]
