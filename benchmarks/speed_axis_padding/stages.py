"""The two stages of A (1,16,3,1) x B (16,1,1,3), rank 5, against the dense conv at batch 64, 32 px, NCHW; each axis padded in its own stage (f) against all padding in the first stage (cur). Run as: python stages.py THREADS."""
import torch, time, sys
import torch.nn.functional as F
import gkpd.runtime
gkpd.runtime.keep_freed_memory()
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(64, 16, 32, 32)
w1 = torch.randn(5, 16, 3, 1); w2 = torch.randn(16, 5, 1, 3); wd = torch.randn(16, 16, 3, 3)
f = lambda: F.conv2d(F.conv2d(x, w1, None, 1, (1, 0)), w2, None, 1, (0, 1))
g = lambda: F.conv2d(x, wd, None, 1, 1)
h = lambda: F.conv2d(x, w1, None, 1, (1, 0))
y1 = h()
k = lambda: F.conv2d(y1, w2, None, 1, (0, 1))
with torch.no_grad():
  for name, fn in (("two", f), ("dense", g), ("s1", h), ("s2", k)):
    ts = []
    for _ in range(30):
        s = time.perf_counter()
        for _ in range(10): fn()
        ts.append(round((time.perf_counter() - s) / 10 * 1e3, 2))
    print(name, ts)
  cur = lambda: F.conv2d(F.conv2d(x, w1, None, 1, (1, 1)), w2, None, 1, 0)
  for pair in ((f, g), (f, cur), (f, h)):
    ts = [[], []]
    for _ in range(20):
        for i, fn in enumerate(pair):
            s = time.perf_counter()
            for _ in range(10): fn()
            ts[i].append(round((time.perf_counter() - s) / 10 * 1e3, 2))
    print("alternating", ts)
