# weightsync-trainer: a trainer that pushes weights with `weightsync push`;
# train_loop.py runs several rounds and checks each one. No vLLM.
ARG BASE_IMAGE=weightsync-deps:local
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS=""

COPY src/ /tmp/weightsync/
RUN pip install $PIP_INSTALL_ARGS /tmp/weightsync && rm -rf /tmp/weightsync
COPY scripts/ /opt/weightsync/

# build.sh prunes superseded (dangling) images by this label, and only those.
LABEL org.weightsync.image="trainer"
ENTRYPOINT ["python3", "/opt/weightsync/train_loop.py"]
