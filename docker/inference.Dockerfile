# weightsync-inference: a vLLM OpenAI server plus the weightsync daemon
# (`weightsync serve`).
#
# BASE_IMAGE must hold python3 with pip and vLLM:
#   local CPU:  weightsync-vllm-cpu:local (vllm-cpu.Dockerfile)
#   GPU:        a public vLLM image, e.g. vllm/vllm-openai:v0.32.0
ARG BASE_IMAGE=weightsync-vllm-cpu:local
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS=""

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

COPY src/ /tmp/weightsync/
RUN python3 -m pip install --no-cache-dir $PIP_INSTALL_ARGS /tmp/weightsync && rm -rf /tmp/weightsync
COPY scripts/ /opt/weightsync/

# build.sh prunes superseded (dangling) images by this label, and only those.
LABEL org.weightsync.image="inference"
EXPOSE 8000
ENTRYPOINT ["weightsync", "serve"]
