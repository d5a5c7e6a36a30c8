# weightsync-deps: Python 3.11 venv with torch (CPU) and weightsync's runtime
# dependencies, no weightsync code. Every other image starts here, so this layer
# is shared and a code change never reinstalls torch.
#
# Local (no registry):  BASE_IMAGE=weightsync-base:<hash>, PIP_INSTALL_ARGS="--no-index --find-links URL"
# With internet:        defaults (python:3.11-slim, torch from the PyTorch CPU index)
# Works with the classic builder and BuildKit alike.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG TORCH_SPEC="torch==2.13.0+cpu"
# safetensors.torch.save_file imports numpy (safetensors 0.8), which
# pyproject.toml does not list; the trainer writes checkpoints with it.
ARG EXTRA_REQUIREMENTS="numpy"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only pyproject.toml: the dependency list comes from it, so this layer is
# rebuilt when the dependencies change, not when the code does.
COPY pyproject.toml /tmp/weightsync/pyproject.toml
RUN python3 -m venv "$VIRTUAL_ENV" \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/weightsync/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/weightsync/requirements.txt \
 && pip install $PIP_INSTALL_ARGS "$TORCH_SPEC" -r /tmp/weightsync/requirements.txt $EXTRA_REQUIREMENTS "setuptools>=68" wheel \
 && rm -rf /tmp/weightsync \
 # torch's C++ test binaries and bundled protoc: ~130 MB nothing here runs.
 && cd "$VIRTUAL_ENV"/lib/python3.11/site-packages/torch \
 && rm -rf test bin/*Test bin/test_* bin/protoc*

CMD ["python3"]
