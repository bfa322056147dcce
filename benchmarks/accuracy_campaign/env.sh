# Sourced by the run_*.sh scripts: the campaign's one budget (issue 12) — 3 epochs x all
# 60,000 Fashion-MNIST training images per cell, the same distillation from the shipped
# ResNet-32 teacher (alpha 0.9, T 4, lr 0.01, batch 128, cosine) — and one thread per job so
# that two jobs can share the 2 cores (GKPD_CAMPAIGN_THREADS=2 when one runs alone).
# cell SEED METHODS RATIOS [DIR [EXTRA OPTIONS...]]: one `gkpd bench accuracy` call into
# DIR/seedSEED (DIR: cells); a cell with an ok result.json is skipped, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}" MKL_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}"
cell() {
  local seed=$1 methods=$2 ratios=$3 dir=${4:-cells}
  OMP_WAIT_POLICY=PASSIVE gkpd -v bench accuracy resnet32_fashion_mnist --data fashion-mnist --ratios "$ratios" \
    --epochs 3 --methods "$methods" --seed "$seed" --no-plot --no-progress "${@:5}" \
    --out "benchmarks/accuracy_campaign/$dir/seed$seed"
}
