"""Step time of gradient-level combiners against a plain weighted sum: same model, same batch, one run.

A small CNN student on a digits batch with three objectives (task cross-entropy, logit KD to a
teacher, feature regression to another teacher through a projector). Each method runs whole
training steps (forward, combiner backward, optimizer step); single steps of the methods are
interleaved (rotating order, so load drift hits all alike) and the median step time is reported,
with the ratio to the weighted sum. On CPU one intra-op thread by default (steadier on a shared box).

    python bench/mgda_bench.py [--device auto|cpu|cuda] [--batch 64] [--width 32] [--rounds 10] [--steps 5] [--threads N]
"""
import argparse, statistics, time
import torch
import torch.nn as nn
import torch.nn.functional as F
from kdnb.core import seed_everything, pick_device
from kdnb.data import load_data
from kdnb.projectors import DistillHeads
from kdnb.balance import make_combiner


class Student(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        w = width
        def block(i, o, s): return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.backbone = nn.Sequential(*block(1, w // 2, 1), *block(w // 2, w, 2), *block(w, w, 1), *block(w, 2 * w, 2),
                                      *block(2 * w, 2 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * w, 10)
    def forward(self, x):
        f = self.backbone(x); return self.fc(f), f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='auto'); ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--rounds', type=int, default=10); ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--width', type=int, default=32); ap.add_argument('--threads', type=int, default=0, help='CPU threads (default 1 on CPU)')
    ap.add_argument('--methods', default='weighted_sum,mgda_ub,dto_kd,mgda')
    a = ap.parse_args(argv)
    dev = pick_device(a.device)
    if a.threads or dev.type == 'cpu': torch.set_num_threads(a.threads or 1)
    seed_everything(0)
    data = load_data('digits')
    x, y, _ = data.split('train')
    idx = torch.randperm(len(x))[:a.batch]
    xb, yb = x[idx].to(dev), y[idx].to(dev)
    t_logits = torch.randn(a.batch, 10, device=dev) * 3               # fixed teacher outputs: teachers are not part of the step
    t_feats = torch.randn(a.batch, 96, device=dev)

    def make_setup():
        seed_everything(0)
        student = Student(a.width).to(dev)
        heads = DistillHeads({'feat_teacher': 96}, student_dim=2 * a.width, kind='linear', norm='standardize').to(dev)
        opt = torch.optim.SGD(list(student.parameters()) + list(heads.parameters()), lr=0.01, momentum=0.9)
        return student, heads, opt

    def make_step(name):
        student, heads, opt = make_setup()
        comb = make_combiner(name, diag_every=0, time_it=False)
        shared = list(student.backbone.parameters())
        other = list(student.fc.parameters()) + [p for p in heads.parameters() if p.requires_grad]
        def step():
            logits, f = student(xb)
            pred, tgt = heads(f, {'feat_teacher': t_feats})['feat_teacher']
            losses = [F.cross_entropy(logits, yb),
                      F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(t_logits / 4, -1), reduction='batchmean', log_target=True) * 16,
                      F.mse_loss(pred, tgt)]
            opt.zero_grad(set_to_none=True)
            d = comb.backward(losses, shared_params=shared, shared_repr=f, other_params=other)
            opt.step()
            return d
        return step

    methods = a.methods.split(',')
    steps = {m: make_step(m) for m in methods}
    info = {}
    for m in methods:                                                  # warm-up (and backward counts)
        for _ in range(3): info[m] = steps[m]()
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    times = {m: [] for m in methods}
    for i in range(a.rounds * a.steps):                                # one step of each method in turn, order rotating
        k = i % len(methods)
        for m in methods[k:] + methods[:k]:
            sync(); t0 = time.perf_counter()
            steps[m]()
            sync(); times[m].append(time.perf_counter() - t0)
    base = statistics.median(times['weighted_sum']) if 'weighted_sum' in times else None
    dev_name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name} | batch {a.batch} x 1x32x32 | student width {a.width} | K=3 objectives | "
          f"{a.rounds * a.steps} interleaved steps per method, median step time")
    print(f"{'method':14s} {'ms/step':>9s} {'ratio':>7s} {'backward calls':>15s} {'through backbone':>17s}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:14s} {1e3 * med:9.2f} {med / base if base else float('nan'):7.3f} {info[m]['n_backward']:15d} {info[m]['n_backbone_backward']:17d}")
    if base and 'mgda_ub' in times:
        r = statistics.median(times['mgda_ub']) / base
        print(f"MGDA-UB / weighted sum = {r:.3f} (goal <= 1.15: {'met' if r <= 1.15 else 'NOT met'})")
    if base and 'mgda' in times:
        print(f"exact MGDA / weighted sum = {statistics.median(times['mgda']) / base:.3f}")
    return {m: statistics.median(v) for m, v in times.items()}


if __name__ == '__main__':
    main()
