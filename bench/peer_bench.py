"""Peer comparison: the same single-teacher Hinton KD run through torchdistill (DistillationBox) and through
kdnb (`kdnb.distill.Distiller`), timed side by side in one process, interleaved. Goal: kdnb not slower.

Both sides get the same teacher and student (timm, same initial weights), the same digits data held in memory,
batch size, optimizer (AdamW, same lr and weight decay), per-step OneCycle schedule, loss and thread count:

    torchdistill  KDLoss(temperature=T, alpha=a)      = a * CE + (1 - a) * T^2 * KL(p_t || p_s)
    kdnb          kd_objectives(['t'], ce_weight=a, kd_weight=1 - a, T=T)   (the same sum; checked on one batch
                  before timing: the two totals must agree to float tolerance)

Both evaluate the validation split once per epoch (kdnb's `fit` always does; the torchdistill loop does what its
example script does: top-1 over `box.val_data_loader`, and keeps the best state in memory as kdnb does).

torchdistill always builds its loaders as a torch DataLoader over a per-sample dataset wrapper (every sample is
fetched with __getitem__ and the batch is collated), while kdnb's TensorLoader slices whole batches out of one
tensor. So three variants are timed:

    torchdistill          DistillationBox, DataLoader over TensorDataset (per-sample collation)
    kdnb                  Distiller.fit() with its own TensorLoader (batch slicing)
    kdnb + DataLoader     Distiller.fit() whose train/val loaders are replaced by the same kind of torch DataLoader
                          over the same TensorDataset (per-sample collation: the like-for-like comparison); it is
                          shuffled by the same seeded sampler, so it is the same training run as torchdistill's up to
                          float rounding (checked before timing: the per-step losses must agree)
    torchdistill again    the control: torchdistill timed a second time in each round (--no-control skips it); how far
                          its ratio is from 1 shows what the machine's noise alone does to a ratio

Each run is timed from its first batch to the end of its last validation (building the box / Distiller is not
counted), as wall time and as this process's CPU time; on a machine shared with other jobs the CPU time is the
steadier of the two. Reported: per-epoch medians over --reps interleaved rounds (round order rotates) after a
warm-up round, and the ratios kdnb / torchdistill (of the medians, of the minimums, and the median of the
per-round ratios, which cancels slow drifts in the machine's load).

    python bench/peer_bench.py [--device cpu] [--reps 5] [--epochs 1] [--threads 1] [--bs 64]

torchdistill is installed on first use if missing (pip, with the project's constraints file plus the torch and
torchvision versions already installed pinned, so torch is never replaced).
"""
import argparse, copy, importlib, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

TORCHDISTILL = 'torchdistill==1.1.5'

def ensure_torchdistill():
    "Import torchdistill, installing it first (constrained so the installed torch stays) when it is missing."
    try: return importlib.import_module('torchdistill')
    except ImportError: pass
    import torch, torchvision
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False) as f: f.write('\n'.join(pins) + '\n')
    cmd = [sys.executable, '-m', 'pip', 'install', '-c', f.name]
    for c in (Path(__file__).resolve().parents[1] / '.venv' / 'kdnb-constraints.txt', Path(sys.prefix) / 'kdnb-constraints.txt'):
        if c.exists(): cmd += ['-c', str(c)]; break
    print('installing', TORCHDISTILL, ':', ' '.join(cmd[3:] + [TORCHDISTILL]), flush=True)
    try: subprocess.check_call(cmd + [TORCHDISTILL])
    finally: os.unlink(f.name)
    importlib.invalidate_caches()
    return importlib.import_module('torchdistill')

import timm, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset, RandomSampler, SequentialSampler
from kdnb.core import Taps, seed_everything, pick_device
from kdnb.data import load_data
from kdnb.distill import Distiller, kd_objectives

from kdnb.models import TapModel as Wrap     # Taps(logits) for kdnb; the wrapped module is the one torchdistill trains directly
from harness_bench import make_models        # the same seeded teacher and student as the harness benchmark

def tensor_datasets(data):
    "The normalized splits as in-memory TensorDatasets (x, y, idx): what torchdistill and the DataLoader variant read."
    return {s: TensorDataset(*data.split(s)) for s in ('train', 'val')}

class XY(torch.utils.data.Dataset):
    "(x, y) view of a TensorDataset (x, y, idx): torchdistill's wrapper expects (sample, target) pairs."
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)
    def __getitem__(self, i): x, y, _ = self.ds[i]; return x, y

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

class Clock:
    "Wall time and this process's CPU time (all threads) between start() and stop(); CPU time is less disturbed by other load."
    def __init__(self, dev): self.dev = dev
    def start(self): sync(self.dev); self.w, self.c = time.perf_counter(), time.process_time(); return self
    def stop(self): sync(self.dev); return time.perf_counter() - self.w, time.process_time() - self.c

# ------------------------------------------------------------------------------------------------ torchdistill
def td_config(bs, lr, wd, alpha, T, epochs, steps_per_epoch, seed):
    "A minimal torchdistill train_config (what its YAML would hold), built in Python."
    return dict(
        num_epochs=epochs,
        train_data_loader=dict(dataset_id='train', sampler=dict(class_or_func=RandomSampler, kwargs=dict(generator=torch.Generator().manual_seed(seed))),
                               kwargs=dict(batch_size=bs, num_workers=0, drop_last=True)),
        val_data_loader=dict(dataset_id='val', requires_supp=False, sampler=dict(class_or_func=SequentialSampler, kwargs=dict()),
                             kwargs=dict(batch_size=bs, num_workers=0)),
        teacher=dict(requires_grad=False, forward_proc='forward_batch_only'), student=dict(requires_grad=True, forward_proc='forward_batch_only'),
        optimizer=dict(key='AdamW', kwargs=dict(lr=lr, weight_decay=wd)),
        scheduler=dict(key='OneCycleLR', kwargs=dict(max_lr=lr, total_steps=epochs * steps_per_epoch), scheduling_step=1),
        criterion=dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(kd=dict(
            criterion=dict(key='KDLoss', kwargs=dict(student_module_path='.', student_module_io='output', teacher_module_path='.',
                                                      teacher_module_io='output', temperature=T, alpha=alpha, reduction='batchmean')),
            weight=1.0)))))

def td_box(teacher, student, dsets, cfg, dev):
    from torchdistill.core.distillation import get_distillation_box
    return get_distillation_box(teacher, student, {'train': XY(dsets['train']), 'val': XY(dsets['val'])}, cfg, dev, None, False, 1)

@torch.no_grad()
def td_evaluate(model, loader, dev):
    "Top-1 and top-5 over the validation loader (what torchdistill's example evaluate computes, minus its logging)."
    model.eval(); hit1 = hit5 = n = 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        z = model(x); top = z.topk(min(5, z.shape[-1]), -1).indices
        hit1 += (top[:, 0] == y).sum().item(); hit5 += (top == y[:, None]).any(-1).sum().item(); n += len(y)
    return hit1 / max(n, 1)

def run_torchdistill(teacher, student, data, dsets, a, dev):
    spe = len(dsets['train']) // a.bs
    box = td_box(teacher, student, dsets, td_config(a.bs, a.lr, a.wd, a.alpha, a.T, a.epochs, spe, 0), dev)
    best, traj, step, total = dict(acc=-1.0, state=None), {}, 0, a.epochs * spe
    clock = Clock(dev).start()
    for ep in range(a.epochs):
        box.pre_epoch_process(epoch=ep)
        for x, y, supp in box.train_data_loader:
            x, y = x.to(dev), y.to(dev)
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss=loss)
            step += 1
            if step % a.log_every == 0 or step == total: traj[step] = loss.item()   # read as often as kdnb logs
        box.post_epoch_process()
        acc = td_evaluate(box.student_model, box.val_data_loader, dev)
        if acc > best['acc']: best = dict(acc=acc, state=copy.deepcopy(box.student_model.state_dict()))
    return clock.stop(), acc, traj

# ------------------------------------------------------------------------------------------------ kdnb
def distiller(teacher, student, data, a, dev):
    return Distiller(Wrap(student), {'t': teacher}, data, kd_objectives(['t'], ce_weight=a.alpha, kd_weight=1 - a.alpha, T=a.T),
                     epochs=a.epochs, batch_size=a.bs, lr=a.lr, weight_decay=a.wd, optimizer='adamw', schedule='onecycle',
                     device=dev, amp=False, channels_last=False, progress=False, log_every=a.log_every)

class DataLoaderAdapter:
    """A torch DataLoader over a TensorDataset (x, y, idx) with TensorLoader's interface (set_epoch, len, (x, y, idx) batches).
    Shuffled like torchdistill's train loader (one RandomSampler whose generator is seeded once), so both see the same batches."""
    def __init__(self, ds, bs, shuffle, drop_last, dev, seed=0):
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
        self.dl, self.dev = DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=drop_last, num_workers=0), dev
    def set_epoch(self, epoch): pass
    def __len__(self): return len(self.dl)
    def __iter__(self):
        for x, y, idx in self.dl: yield x.to(self.dev), y.to(self.dev), idx

def run_kdnb(teacher, student, data, dsets, a, dev, dataloader=False):
    d = distiller(teacher, student, data, a, dev)
    if dataloader:
        d.loaders['train'] = DataLoaderAdapter(dsets['train'], a.bs, True, True, dev)
        d.loaders['val'] = DataLoaderAdapter(dsets['val'], a.bs, False, False, dev)
        assert len(d.loaders['train']) == d.steps_per_epoch
    clock = Clock(dev).start(); d.fit(); t = clock.stop()
    return t, d.epoch_log[-1]['val_acc'], {h['step']: h['loss'] for h in d.history}

# ------------------------------------------------------------------------------------------------ same objective
def check_same_loss(teacher, student0, data, dsets, a, dev):
    "Both frameworks' training loss on one batch, same weights, students in eval mode: the totals must agree."
    spe = len(dsets['train']) // a.bs
    s_td, s_kd = copy.deepcopy(student0).eval(), copy.deepcopy(student0).eval()
    box = td_box(teacher, s_td, dsets, td_config(a.bs, a.lr, a.wd, a.alpha, a.T, a.epochs, spe, 0), dev)
    d = distiller(teacher, s_kd, data, a, dev); s_kd.eval()
    x, y, idx = dsets['train'][:a.bs]
    x, y = x.to(dev), y.to(dev)
    with torch.no_grad():
        l_td = box.forward_process(x, y, {}).item()
        losses, *_ = d.losses(x, y, idx)
        l_kd = sum(o.weight * losses[o.name] for o in d.objectives).item()
    assert abs(l_td - l_kd) <= 1e-4 * max(1.0, abs(l_td)), f"losses differ: torchdistill {l_td} vs kdnb {l_kd}"
    return l_td, l_kd

VARIANTS = {'torchdistill': run_torchdistill, 'kdnb': run_kdnb,
            'kdnb + DataLoader': lambda *args: run_kdnb(*args, dataloader=True),
            'torchdistill again': run_torchdistill}     # the control: torchdistill against itself shows the noise floor
PATHS = {'torchdistill': 'DataLoader, per-sample collation', 'kdnb': 'TensorLoader, batch slicing',
         'kdnb + DataLoader': 'DataLoader, per-sample collation', 'torchdistill again': 'DataLoader, per-sample collation'}
ROLE = {'kdnb': 'goal <= 1: kdnb not slower', 'kdnb + DataLoader': 'same data path on both sides',
        'torchdistill again': 'control: the same run twice; its distance from 1 is the noise'}

def check_same_run(teacher, student0, data, dsets, a, dev):
    """One untimed epoch through torchdistill and through kdnb + DataLoader, logging the loss at every step: same
    initial weights, same batches in the same order, same loss and optimizer, so the same training run. The two
    compute the KL with different (equivalent) formulas, so they differ by float rounding, which training then
    slowly amplifies: the first steps must agree to 1e-4 (relative), the whole epoch to 1e-2."""
    b = argparse.Namespace(**{**vars(a), 'log_every': 1, 'epochs': 1})
    *_, tr_td = run_torchdistill(teacher, copy.deepcopy(student0), data, dsets, b, dev)
    *_, tr_kd = run_kdnb(teacher, copy.deepcopy(student0), data, dsets, b, dev, dataloader=True)
    assert tr_td.keys() == tr_kd.keys(), f"logged steps differ: {sorted(tr_td)} vs {sorted(tr_kd)}"
    rel = [abs(tr_td[k] - tr_kd[k]) / max(abs(tr_td[k]), 1e-12) for k in sorted(tr_td)]
    assert max(rel[:5]) < 1e-4 and max(rel) < 1e-2, f"torchdistill and kdnb + DataLoader trained differently: relative loss differences {rel}"
    return max(rel[:5]), max(rel), len(rel)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu'); ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--epochs', type=int, default=1); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--teacher', default='resnet10t'); ap.add_argument('--student', default='test_resnet')
    ap.add_argument('--bs', type=int, default=64); ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--wd', type=float, default=0.05); ap.add_argument('--alpha', type=float, default=0.1, help='CE weight (KD weight 1 - alpha)')
    ap.add_argument('--T', type=float, default=4.0); ap.add_argument('--log-every', type=int, default=10)
    ap.add_argument('--no-control', action='store_true', help="skip the 'torchdistill again' control run")
    a = ap.parse_args(argv)
    td = ensure_torchdistill()
    torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    data = load_data('digits')
    dsets = tensor_datasets(data)
    teacher, student0 = make_models(data, a.teacher, a.student, dev)
    l_td, l_kd = check_same_loss(teacher, student0, data, dsets, a, dev)
    print(f"same objective on one batch: torchdistill {l_td:.6f}  kdnb {l_kd:.6f}")
    d5, dall, n = check_same_run(teacher, student0, data, dsets, a, dev)
    print(f"same training run (torchdistill vs kdnb + DataLoader, one epoch, loss at each of {n} steps): relative difference "
          f"<= {d5:.1e} over the first 5 steps, <= {dall:.1e} over the epoch (float rounding, amplified by training)", flush=True)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    times, cpus, accs = {k: [] for k in VARIANTS}, {k: [] for k in VARIANTS}, {k: [] for k in VARIANTS}
    names = [k for k in VARIANTS if not (a.no_control and k == 'torchdistill again')]
    for r in range(a.reps + 1):                                  # round 0 is a warm-up, not counted
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            (t, c), acc, _ = VARIANTS[name](teacher, copy.deepcopy(student0), data, dsets, a, dev)
            if r > 0: times[name].append(t / a.epochs); cpus[name].append(c / a.epochs); accs[name].append(acc)
            print(f"  round {r} {name:18s} {t / a.epochs:7.3f} s/epoch wall {c / a.epochs:7.3f} s/epoch cpu  val top-1 {acc:.3f}"
                  + ('  (warm-up)' if r == 0 else ''), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    load_end = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f"\npeer comparison: {a.teacher} -> {a.student}, digits {len(dsets['train'])} train / {len(dsets['val'])} val, batch {a.bs}, "
          f"{a.epochs} epoch(s) per run, {dev}, {torch.get_num_threads()} thread(s), torchdistill {td.__version__}, torch {torch.__version__}")
    print(f"loss: {a.alpha} * CE + {1 - a.alpha:g} * T^2 * KL, T={a.T}; AdamW lr {a.lr} wd {a.wd}, OneCycle per step; "
          f"validation once per epoch on every side; median of {a.reps} interleaved rounds after a warm-up")
    if load: print(f"load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}")
    print(f"\n  {'variant':20s} {'data path':34s} {'s/epoch':>8s} {'min':>7s} {'max':>7s} {'cpu s/ep':>8s} {'val top-1':>9s}")
    for k in names:
        print(f"  {k:20s} {PATHS[k]:34s} {med[k]:8.3f} {min(times[k]):7.3f} {max(times[k]):7.3f} {cmed[k]:8.3f} {statistics.median(accs[k]):9.3f}")
    def ratios(k, xs):
        "kdnb variant / torchdistill three ways: ratio of medians, ratio of minimums, median of the per-round ratios."
        return (statistics.median(xs[k]) / statistics.median(xs['torchdistill']), min(xs[k]) / min(xs['torchdistill']),
                statistics.median([u / v for u, v in zip(xs[k], xs['torchdistill'])]))
    print(f"\n  {'ratio to torchdistill':24s} {'of medians':>17s} {'of minimums':>17s} {'per-round median':>17s}")
    print(f"  {'':24s}" + f" {'wall':>8s} {'cpu':>8s}" * 3)
    for k in names[1:]:
        w, c = ratios(k, times), ratios(k, cpus)
        print(f"  {k:24s}" + ''.join(f" {u:8.3f} {v:8.3f}" for u, v in zip(w, c)) + f"   ({ROLE[k]})")
    print("\nnote: torchdistill's loaders always fetch samples one by one and collate them; kdnb's TensorLoader slices a batch "
          "from one tensor. The 'kdnb + DataLoader' row feeds kdnb's own fit loop the same kind of DataLoader (its train/val "
          "loaders replaced by an adapter), so that ratio compares the training harnesses alone.")
    return dict(median=med, cpu_median=cmed, times=times, cpu=cpus, acc=accs)

if __name__ == '__main__':
    main()
