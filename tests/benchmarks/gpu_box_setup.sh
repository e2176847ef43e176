# Sourced at the start of every device call, from the repo root: wheels into /tmp/site (once per machine),
# distilflow's namespace package as symlinks to this checkout (what pyproject's package-dir maps).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/w/*.whl || exit 3
  touch /tmp/site/.installed
fi
mkdir -p /tmp/site/distilflow /tmp/site/distilflow-0.1.0.dist-info
for s in tasks flows configs docker; do ln -sfn "$PWD/$s" /tmp/site/distilflow/$s; done
printf 'Metadata-Version: 2.1\nName: distilflow\nVersion: 0.1.0\n' > /tmp/site/distilflow-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD
echo "setup ok: $(date -u +%FT%TZ) $(hostname)"
