# GPU serving image for ${model_name}: vLLM's OpenAI-compatible server on the bundle's checkpoint.
# Rendered by distilflow from docker/serve-vllm.Dockerfile. From the bundle directory:
#   docker build -t ${model_name} .
#   docker run --gpus all --ipc=host -p ${port}:${port} ${model_name}
#   curl -s localhost:${port}/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
FROM ${base_image}

LABEL org.opencontainers.image.title="${model_name}" \
      org.opencontainers.image.description="${description}" \
      org.opencontainers.image.licenses="${license}"

COPY . /model

EXPOSE ${port}

# Loading and compiling take a while on first start; /health answers once the engine is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${port}/health', timeout=4)"]

# The base image's entrypoint is `vllm serve`; serve.yaml holds the served name, dtype, context
# length and quantization read from the checkpoint. Its host (127.0.0.1) is replaced: inside a
# container the published port reaches only a server listening on 0.0.0.0.
CMD ["/model", "--config", "/model/serve.yaml", "--host", "0.0.0.0"]
