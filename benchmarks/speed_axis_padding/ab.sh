#!/bin/bash
# alternate old (3625f36) and new (e684460) speed benches, each alone, fresh latency cache
. /work/main/.venv/bin/activate
for i in 1 2; do
  for side in old new; do
    tree=/work/frozen22; [ $side = new ] && tree=/work/frozen22b
    cd $tree
    PYTHONPATH=$tree/src gkpd -v bench speed resnet32_fashion_mnist --ratios 5 --batches 1,64 --objectives error,latency --backends eager --peers none --threads 2 --no-memory --latency-cache /work/s22/ab_cache_${side}_$i.json --out /work/s22/ab/${side}_$i > /work/s22/ab/${side}_$i.log 2>&1
  done
done
cd /work/frozen22b
PYTHONPATH=/work/frozen22b/src gkpd -v bench speed resnet50 --input-size 3,224,224 --ratios 2 --batches 8 --objectives error,latency --backends eager --peers none --threads 2 --no-memory --rounds 7 --latency-cache /work/s22/r50_cache.json --out /work/s22/ab/resnet50_new > /work/s22/ab/resnet50_new.log 2>&1
echo done > /work/s22/ab/DONE
