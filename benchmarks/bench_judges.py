"""Candidate judges for `ditforge eval RUN` on an image folder: held-out accuracy and training time.

    python benchmarks/make_mnist_folder.py /tmp/mnist3k
    PYTHONPATH=src python benchmarks/bench_judges.py /tmp/mnist3k

Trains each on the folder's training split (the split `ditforge train` uses) and reads its
held-out split. The chosen one, the batch-normalised CNN, lives in `src/ditforge/evaluation/judge.py`;
the Inception linear probe is timed on 500 training images (Inception-v3 is the slow part).
"""
import sys
import time

import numpy as np
import torch

torch.set_num_threads(2)
from ditforge.data.sources import load_data
tr, he = load_data(sys.argv[1], "train"), load_data(sys.argv[1], "heldout")
print(len(tr), len(he), tr.shape, len(tr.skipped))
xtr, ytr = tr.images.reshape(len(tr), -1).numpy(), tr.labels.numpy()
xhe, yhe = he.images.reshape(len(he), -1).numpy(), he.labels.numpy()
def rep(name, t0, pred):
    print(f"{name}: {time.perf_counter()-t0:.1f} s, held-out acc {(pred == yhe).mean():.3f}", flush=True)
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
t0 = time.perf_counter(); m = LogisticRegression(max_iter=300, C=0.05).fit(xtr, ytr); rep("logreg", t0, m.predict(xhe))
t0 = time.perf_counter(); m = MLPClassifier((256,), max_iter=200, random_state=0).fit(xtr, ytr); rep("mlp256", t0, m.predict(xhe))
t0 = time.perf_counter(); m = SVC(gamma="scale", C=10).fit(xtr, ytr); rep("svc", t0, m.predict(xhe))
import torch.nn as nn, torch.nn.functional as F
def cnn(c, k):
    return nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, k))
for epochs in (5, 10, 20):
    torch.manual_seed(0)
    net = cnn(1, 10); opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    x, y = tr.images, tr.labels
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for s in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        xb = x[i]
        # random shift by up to 2 px
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        xb = torch.roll(F.pad(xb, (2,2,2,2), value=-1), (dy, dx), (2, 3))[:, :, 2:-2, 2:-2]
        loss = F.cross_entropy(net(xb), y[i]); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    net.eval()
    with torch.no_grad(): pred = net(he.images).argmax(1).numpy()
    rep(f"cnn {epochs} epochs ({steps} steps)", t0, pred)
# the chosen judge, as `ditforge eval` trains it
from ditforge.evaluation.judge import score_heldout, train_judge

t0 = time.perf_counter()
judge = train_judge(tr.images, tr.labels, tr.num_classes, "bench")
score_heldout(judge, he.images, he.labels)
print(f"ditforge judge (bn-cnn, {judge.info.steps} steps): {time.perf_counter() - t0:.1f} s, held-out acc {judge.info.heldout_accuracy:.3f}")
# Inception linear probe on 500 training images
from sklearn.linear_model import LogisticRegression as LR2

from ditforge.evaluation.run_report import pixels
from ditforge.metrics import InceptionFeatures

inc = InceptionFeatures(None, batch_size=50, spatial=False)
rng = np.random.default_rng(0)
itr, ihe = rng.choice(len(tr), 500, replace=False), rng.choice(len(he), 200, replace=False)
t0 = time.perf_counter()
ftr = inc(pixels(tr.images[itr]))["pool"]
print(f"inception: {500 / (time.perf_counter() - t0):.1f} images/s")
fhe = inc(pixels(he.images[ihe]))["pool"]
probe = LR2(max_iter=1000).fit(ftr, ytr[itr])
print(f"inception linear probe (500 train): held-out acc {(probe.predict(fhe) == yhe[ihe]).mean():.3f}")
