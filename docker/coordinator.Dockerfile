# weightsync-coordinator: the gRPC coordinator. No vLLM.
ARG BASE_IMAGE=weightsync-deps:local
FROM ${BASE_IMAGE}

ARG PIP_INSTALL_ARGS=""

# The same three steps as trainer.Dockerfile, so both images share these layers.
COPY src/ /tmp/weightsync/
RUN pip install $PIP_INSTALL_ARGS /tmp/weightsync && rm -rf /tmp/weightsync
COPY scripts/ /opt/weightsync/

# build.sh prunes superseded (dangling) images by this label, and only those.
LABEL org.weightsync.image="coordinator"
EXPOSE 50051 9400
HEALTHCHECK --interval=2s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "/opt/weightsync/healthcheck.py", "grpc", "127.0.0.1:50051"]
ENTRYPOINT ["weightsync", "coordinator"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-port", "9400", "--metrics-addr", "0.0.0.0"]
