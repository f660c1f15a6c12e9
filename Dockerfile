# One image for the fleet controller keeper, the Ray head and the Ray workers
# (k8s/base/kustomization.yaml refers to it as `ascend-fleet`).
#
#   CPU stand-ins (k8s/overlays/cpu-dev):
#     docker build -t ascend-fleet:0.1.0 .
#   Ascend 910 (k8s/overlays/ascend-910): a base image with CANN and Python 3.11
#   (the one your MindSpore 2.10 build was made for), e.g. from your Ascend registry:
#     docker build --build-arg BASE_IMAGE=<cann-python3.11-image:tag> -t ascend-fleet:0.1.0-cann .
#
# The Ascend driver and /dev/davinci* come from the node (Ascend Docker Runtime
# and the device plugin), not from this image.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# 1000:1000 matches HwHiAiUser, the owner of the Ascend device nodes on a
# default driver install; the pods run as this user (runAsNonRoot).
ARG FLEET_UID=1000
ARG FLEET_GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/tmp

WORKDIR /opt/ascend-fleet
COPY pyproject.toml README.md ./
COPY launcher ./launcher
COPY workloads ./workloads

# ray[default] brings the dashboard agent the pods' health probes call;
# ray[client] the ray:// server that `fleet submit --address` talks to.
RUN python -m pip install "ray[default,client]==2.60.0" ".[k8s]" \
 && (getent group "${FLEET_GID}" || groupadd --gid "${FLEET_GID}" fleet) \
 && (getent passwd "${FLEET_UID}" || useradd --uid "${FLEET_UID}" --gid "${FLEET_GID}" \
        --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fleet)

# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 1000:1000
# The root file system is read-only in the pods; /tmp is an emptyDir there.
WORKDIR /tmp
