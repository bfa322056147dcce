"""Make the two plans the A/B timing loads: python ab_make.py DIR (writes DIR/error5 and
DIR/latency5_b1; the latency timing cached in DIR/latency.json)."""
import sys
import torch, gkpd, copy
from gkpd.models.pretrained import load_pretrained
from gkpd.plan.objective import LatencyObjective
torch.set_num_threads(2)
dense = load_pretrained("resnet32_fashion_mnist").eval()
x1 = torch.randn(1, 1, 28, 28)
m, p = gkpd.compress(copy.deepcopy(dense), x1, ratio=5)
gkpd.save(f"{sys.argv[1]}/error5", m, p)
m, p = gkpd.compress(copy.deepcopy(dense), x1, ratio=5, objective=LatencyObjective(batch=1, cache=f"{sys.argv[1]}/latency.json"))
gkpd.save(f"{sys.argv[1]}/latency5_b1", m, p)
