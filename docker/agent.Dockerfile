# The robot agent (`rise-agent`): RealSense cameras, Piper arms over CAN, the policy as a gRPC
# client. No torch and no services: only the base dependencies plus the `agent` extra of the lock.
#
#   docker build -f docker/agent.Dockerfile -t rise-agent .
#   docker run --rm --network host --device /dev/bus/usb --group-add plugdev rise-agent --help
#
# Host networking reaches the robot's SocketCAN interface (can0) and the policy service; the USB
# device (and its group) reaches the cameras. BASE_IMAGE and the PIP_* arguments work as in
# docker/Dockerfile.

ARG BASE_IMAGE=python:3.12-slim-bookworm

FROM ${BASE_IMAGE} AS base
# libusb: pyrealsense2 talks to the cameras through it.
ARG SYSTEM_PACKAGES="libusb-1.0-0"
# hadolint ignore=DL3008,SC2086
RUN if [ -n "$SYSTEM_PACKAGES" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends $SYSTEM_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/rise --shell /usr/sbin/nologin rise

FROM base AS deps
ARG PYTHON=python3.12
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_CERT
WORKDIR /opt/rise/src
# Only what the locked environment depends on, so that it stays cached while code and docs change.
COPY requirements.lock pyproject.toml ./
COPY docker/lock_subset.py docker/
RUN "$PYTHON" docker/lock_subset.py --extras agent requirements.lock > /tmp/requirements.txt \
    && "$PYTHON" -m venv /opt/rise/venv \
    && /opt/rise/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.txt
COPY . .
# In place, like the services (docker/Dockerfile): package data stays beside the code.
RUN /opt/rise/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && /opt/rise/venv/bin/python -m compileall -q rise robot_agent \
    && /opt/rise/venv/bin/python -c "import robot_agent, sys; sys.exit('torch' in sys.modules)"

FROM base AS runtime
ENV PATH=/opt/rise/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/rise
# The agent is a gRPC client, not a server: there is no health service to ask. Its liveness is its
# process (a restart policy brings it back); the policy service it needs has its own check.
HEALTHCHECK NONE
ENTRYPOINT ["rise-agent"]
CMD ["--help"]
COPY --from=deps /opt/rise /opt/rise
