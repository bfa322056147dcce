"""Time the plans of ab_make.py beside the dense model in channels_last, in one process:
python ab_time.py DIR LABEL [b1] (b1: batch 1 only). Run alternately from two worktrees
(PYTHONPATH=WORKTREE/src) to compare their code on the same plans."""
import torch, gkpd, copy, json, sys
from gkpd.models.pretrained import load_pretrained
from gkpd.timing import time_interleaved
torch.set_num_threads(2)
dense = load_pretrained("resnet32_fashion_mnist").eval()
densecl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
err = gkpd.load(f"{sys.argv[1]}/error5", copy.deepcopy(dense))
lat = gkpd.load(f"{sys.argv[1]}/latency5_b1", copy.deepcopy(dense))
x1 = torch.randn(1, 1, 28, 28); x64 = torch.randn(64, 1, 28, 28)
out = {}
r = time_interleaved({"dense_cl": lambda: densecl(x1), "error": lambda: err(x1), "latency_b1": lambda: lat(x1)}, rounds=400, warmup=20)
out["b1"] = {k: v * 1e3 for k, v in r.items()}
if len(sys.argv) < 4: r = time_interleaved({"dense_cl": lambda: densecl(x64), "error": lambda: err(x64)}, rounds=40, warmup=3)
if len(sys.argv) < 4: out["b64"] = {k: v * 1e3 for k, v in r.items()}
print(sys.argv[2], json.dumps(out))
