"""Epoch time of 3-teacher distillation with online teachers, with the teacher-output cache, and of
the student trained alone: same student, data, batches and optimizer; ratios printed at the end.

    python bench/cache_bench.py [--student resnet_s] [--reps 7] [--batch-size 128] [--device auto] [--threads 1]

Each mode runs one untimed warm-up epoch, then `--reps` timed epochs, interleaved (alone, cached,
online, cached, online, alone, ...) so that drift in machine load hits every mode alike; the
median epoch (wall clock, and the process CPU time next to it) is reported. On CPU the default is
one intra-op thread: on a small shared machine several OpenMP threads per process oversubscribe the
cores and the timings become noise; `--threads 0` keeps torch's default. The KD step is Hinton et al.'s loss (NIPS 2014 workshop, arXiv:1503.02531) against the
mean of the teachers' softened probabilities, plus cross-entropy.
"""
import argparse, statistics, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdnb.core import seed_everything, pick_device
from kdnb.data import load_data, TensorLoader
from kdnb.models import create_model
from kdnb.teachers import TeacherBank, TEACHERS, STUDENTS
from kdnb.cache import build_cache


def kd_loss(s_logits, t_logits: list, y, T: float = 4.0, alpha: float = 0.5):
    "Cross-entropy plus T^2-scaled KL to the mean of the teachers' temperature-T probabilities."
    p_t = torch.stack([t.float().div(T).softmax(-1) for t in t_logits]).mean(0)
    kl = F.kl_div(s_logits.div(T).log_softmax(-1), p_t, reduction='batchmean') * T * T
    return alpha * F.cross_entropy(s_logits, y) + (1 - alpha) * kl


def make_step(mode, student, opt, bank, cache):
    def step(x, y, idx):
        if mode == 'online':
            with torch.inference_mode(): tl = [t.logits for t in bank(x).values()]
            tl = [t.clone() for t in tl]                  # leave inference mode for autograd
        elif mode == 'cached':
            tl = [t.logits for t in cache.lookup(idx, device=x.device).values()]
        out = student(x).logits
        loss = F.cross_entropy(out, y) if mode == 'alone' else kd_loss(out, tl, y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return step


def epoch_time(step, loader, epoch, device):
    "(wall seconds, process CPU seconds) of one epoch."
    loader.set_epoch(epoch)
    if device.type == 'cuda': torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y, idx in loader: step(x, y, idx)
    if device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--student', default='resnet_s', choices=list(STUDENTS))
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--device', default='auto')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads on CPU (0: leave the default)')
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    if a.threads and dev.type == 'cpu': torch.set_num_threads(a.threads)
    data = load_data('digits')
    bank = TeacherBank.from_zoo(TEACHERS, data, taps=('logits',), device=dev)
    t0 = time.perf_counter()
    cache = build_cache(bank, data, splits='train', dtype='float16', progress=False)
    build_s = time.perf_counter() - t0
    loader = TensorLoader(data, 'train', a.batch_size, seed=0, device=dev)
    modes = ['alone', 'cached', 'online']
    steps = {}
    for m in modes:
        seed_everything(0)
        student = create_model(a.student, data.num_classes, data.channels, img_size=data.size).to(dev).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        steps[m] = make_step(m, student, opt, bank, cache)
        epoch_time(steps[m], loader, 0, dev)                       # warm-up
    times = {m: [] for m in modes}
    for r in range(a.reps):
        order = modes[r % 3:] + modes[:r % 3]
        for m in order: times[m].append(epoch_time(steps[m], loader, r + 1, dev))
    med = {m: statistics.median(w for w, _ in v) for m, v in times.items()}
    cpu = {m: statistics.median(c for _, c in v) for m, v in times.items()}
    print(f"\nteachers {list(TEACHERS)} -> student {a.student}; digits train split ({len(data.splits['train'])} images), "
          f"batch {a.batch_size}, device {dev}, torch threads {torch.get_num_threads()}, {a.reps} timed epochs each")
    print(f"cache: {cache.path.name}, {cache.nbytes / 2**20:.2f} MB, ready in {build_s:.1f} s (built on the first run, checked and reused after)\n")
    print(f"| mode | epoch wall time (s, median) | epoch CPU time (s, median) | all epochs, wall (s) |")
    print(f"| --- | --- | --- | --- |")
    labels = {'alone': 'student alone', 'cached': '3-teacher KD, cached', 'online': '3-teacher KD, online'}
    for m in modes: print(f"| {labels[m]} | {med[m]:.3f} | {cpu[m]:.3f} | {', '.join(f'{w:.3f}' for w, _ in times[m])} |")
    r1, r2 = med['cached'] / med['alone'], med['online'] / med['cached']
    print(f"\ncached / student-alone = {r1:.2f}  (goal <= 1.10: {'met' if r1 <= 1.10 else 'NOT met'}; CPU time {cpu['cached'] / cpu['alone']:.2f})")
    print(f"online / cached        = {r2:.2f}  (goal >= 3:    {'met' if r2 >= 3 else 'NOT met'}; CPU time {cpu['online'] / cpu['cached']:.2f})")
    return dict(median=med, cpu=cpu, cached_over_alone=r1, online_over_cached=r2)


if __name__ == '__main__':
    main()
