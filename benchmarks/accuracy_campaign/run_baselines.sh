#!/usr/bin/env bash
# The accuracy campaign's baseline cells (issue #12): every method but GKPD, at 5x and 10x, each
# fine-tuned 3 epochs x all 60,000 Fashion-MNIST training images with the same distillation from
# the shipped ResNet-32 teacher (alpha 0.9, T 4, lr 0.01, batch 128, cosine). One directory per
# seed; a cell with a result.json is skipped, an interrupted one resumes from its checkpoint, so
# rerunning this script continues where it stopped. Runs on one thread so that it can share the
# machine with other work: GKPD_CAMPAIGN_THREADS=2 when it runs alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}" MKL_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}"
OUT=benchmarks/accuracy_campaign/cells
cell() {  # SEED METHODS
  gkpd -v bench accuracy resnet32_fashion_mnist --data fashion-mnist --ratios 5,10 --epochs 3 \
    --methods "$2" --seed "$1" --no-plot --no-progress --out "$OUT/seed$1"
}
# closest to GKPD in the recorded 2x16k run first, so that their extra seeds start early
cell 0 tucker
cell 1 tucker
cell 2 tucker
cell 0 tensor_train
cell 0 prune
cell 0 tensor_ring
cell 0 svd
cell 0 cp
cell 0 student
