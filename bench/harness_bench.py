"""Harness overhead: the same single-teacher KD recipe through `kdnb.distill.Distiller` and through a
minimal hand-written PyTorch loop (identical models, data, batch size, optimizer, schedule, threads),
timed side by side in one run, interleaved. Goal: kdnb / hand <= 1.03.

    python bench/harness_bench.py [--device cpu] [--reps 3] [--epochs 1]
"""
import argparse, copy, statistics, time
import timm, torch, torch.nn as nn, torch.nn.functional as F
from kdnb.core import Taps, seed_everything, pick_device
from kdnb.data import load_data, get_loaders
from kdnb.distill import Distiller, kd_objectives

from kdnb.models import TapModel as Wrap     # a timm model returning Taps(logits): the same module runs in both loops

def make_models(data, teacher_arch, student_arch, dev):
    seed_everything(1); t = timm.create_model(teacher_arch, num_classes=data.num_classes, in_chans=data.channels).to(dev).eval()
    seed_everything(0); s = timm.create_model(student_arch, num_classes=data.num_classes, in_chans=data.channels).to(dev)
    return t, s

def hand_loop(teacher, student, data, epochs, bs, lr, T, dev):
    dls = get_loaders(data, batch_size=bs, seed=0, device=dev, drop_last=True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(dls['train']))
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    sync(); t0 = time.perf_counter()
    for ep in range(epochs):
        student.train(); dls['train'].set_epoch(ep)
        for i, (x, y, _) in enumerate(dls['train']):
            with torch.inference_mode(): tl = teacher(x)
            tl = tl.clone()
            z = student(x)
            kd = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(tl / T, -1), reduction='batchmean', log_target=True) * T * T
            loss = 0.1 * F.cross_entropy(z, y) + 0.9 * kd
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
            if (i + 1) % 10 == 0: loss.item()
        student.eval()
        with torch.no_grad(): sum((student(x).argmax(-1) == y).sum().item() for x, y, _ in dls['val'])
    sync(); return time.perf_counter() - t0

def kdnb_loop(teacher, student, data, epochs, bs, lr, T, dev):
    d = Distiller(Wrap(student), {'t': Wrap(teacher)}, data, kd_objectives(['t'], T=T), epochs=epochs, batch_size=bs, lr=lr,
                  device=dev, amp=False, channels_last=False, progress=False, log_every=10)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    sync(); t0 = time.perf_counter(); d.fit(); sync()
    return time.perf_counter() - t0

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--device', default='cpu'); ap.add_argument('--reps', type=int, default=3); ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--teacher', default='resnet10t'); ap.add_argument('--student', default='test_resnet'); ap.add_argument('--bs', type=int, default=64)
    a = ap.parse_args()
    dev = pick_device(a.device)
    data = load_data('digits')
    teacher, student0 = make_models(data, a.teacher, a.student, dev)
    times = {'hand': [], 'kdnb': []}
    for r in range(a.reps + 1):                      # first round is a warm-up, not counted
        for name, fn in (('hand', hand_loop), ('kdnb', kdnb_loop)) if r % 2 == 0 else (('kdnb', kdnb_loop), ('hand', hand_loop)):
            t = fn(teacher, copy.deepcopy(student0), data, a.epochs, a.bs, 2e-3, 4.0, dev)
            if r > 0: times[name].append(t)
            print(f"  round {r} {name:5s} {t:7.2f} s" + ('  (warm-up)' if r == 0 else ''), flush=True)
    h, k = statistics.median(times['hand']), statistics.median(times['kdnb'])
    print(f"\nharness overhead ({a.teacher} -> {a.student}, {a.epochs} epoch(s), batch {a.bs}, {dev}, {torch.get_num_threads()} threads, median of {a.reps}):")
    print(f"  hand-written loop {h:7.2f} s\n  kdnb Distiller    {k:7.2f} s\n  ratio kdnb/hand   {k / h:7.3f}   (goal <= 1.03)")
