# CPU serving image for ${model_name}: llama.cpp's OpenAI-compatible llama-server on the GGUF export.
# Rendered by distilflow from docker/serve-llamacpp.Dockerfile. From the bundle's gguf/ directory:
#   docker build -t ${model_name}-cpu .
#   docker run -p ${port}:${port} ${model_name}-cpu
#   curl -s localhost:${port}/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
FROM ${base_image}

LABEL org.opencontainers.image.title="${model_name}" \
      org.opencontainers.image.description="${description}" \
      org.opencontainers.image.licenses="${license}"

COPY ${gguf_file} /models/${gguf_file}

ENV LLAMA_ARG_HOST=0.0.0.0
EXPOSE ${port}

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:${port}/health"]

# The base image's entrypoint is llama-server; --jinja applies the chat template stored in the GGUF.
CMD ["--model", "/models/${gguf_file}", "--alias", "${model_name}", "--port", "${port}", "--ctx-size", "${context_length}", "--jinja"]
