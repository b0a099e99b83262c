"""Data at scale, four figures each measured side by side in one run and printed with its goal:

1. loader throughput: `StreamLoader` (2 workers) over a generated ImageFolder of JPEGs at 224 px, against the
   decode limit: the same files decoded and resized by the same number of processes doing nothing else (goal >= 0.90);
2. peak resident memory of one streamed epoch over N vs 4N generated images (goal: growth <= 10 %);
3. epoch time of a cached K-teacher distillation / the student alone, K = 1, 2, 4, 8 (goal <= 1.05 for every K),
   with the online K-teacher epoch printed beside it;
4. cache build time / the teachers' own forward time over the same samples (goal <= 1.10).

    python bench/data_bench.py [--images 5000] [--size 224] [--workers 2] [--reps 3] [--device auto]

Alternatives are interleaved (A, B, A, B, ...) so that drift in machine load hits both alike; medians are reported.
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time
from multiprocessing import Pool
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdnb.core import seed_everything, pick_device
from kdnb.data import load_data, TensorLoader, StreamLoader, LazyImages
from kdnb.models import create_model
from kdnb.teachers import TeacherBank, load_teacher
from kdnb.cache import build_cache


def make_jpegs(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    "n JPEGs (smooth random images, like photos in size) in `classes` class folders; reused when present."
    from PIL import Image
    done = root / f'.done-{n}-{size}'
    if done.exists(): return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f'c{i % classes}'; d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(d / f'{i}.jpg', quality=85)
    done.touch()
    return root


_LAZY = None
def _init(files, size):
    global _LAZY
    _LAZY = LazyImages(files, size=size)
def _decode(i): _LAZY.decode(i); return None


def throughput(args, tmp: Path):
    root = make_jpegs(tmp / f'jpeg{args.images}', args.images, args.size)
    data = load_data('imagefolder', root, size=args.size, stream=True, workers=args.workers)
    rows = data.splits['train'].tolist()
    dl = StreamLoader(data, 'train', 64, workers=args.workers)
    files = data.images.files
    with Pool(args.workers, _init, (files, args.size)) as pool:
        pool.map(_decode, rows[:64], chunksize=8)           # warm-up both
        for _ in dl: break
        lim, ld = [], []
        for r in range(args.reps):
            t = time.perf_counter(); pool.map(_decode, rows, chunksize=16); lim.append(len(rows) / (time.perf_counter() - t))
            dl.set_epoch(r); t = time.perf_counter(); n = sum(len(y) for _, y, _ in dl); ld.append(n / (time.perf_counter() - t))
    return statistics.median(ld), statistics.median(lim), len(rows)


def _memory_child(root, size, workers):
    "One streamed epoch in a fresh process; prints its peak RSS and its workers' (MB)."
    data = load_data('imagefolder', root, size=size, stream=True, workers=workers)
    n = 0
    for x, y, _ in StreamLoader(data, 'train', 64, workers=workers): n += len(y)
    del data
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(dict(n=n, main_mb=me, worker_mb=kids)))


def memory(args, tmp: Path):
    out = {}
    sizes = (args.mem_images, 4 * args.mem_images)
    roots = {n: make_jpegs(tmp / f'mem{n}', n, args.mem_size) for n in sizes}
    for rep in range(2):
        for n in sizes:
            r = subprocess.run([sys.executable, __file__, '--memory-child', str(roots[n]), str(args.mem_size), str(args.workers)],
                               capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            out.setdefault(n, []).append(m['main_mb'] + m['worker_mb'])
    return {n: min(v) for n, v in out.items()}


def cached_vs_alone(args, dev):
    data = load_data('digits')
    base = load_teacher('resnet_t', data)
    res = {}
    for K in (1, 2, 4, 8):
        bank = TeacherBank({f't{k}': base for k in range(K)}, data=data, device=dev)
        cache = build_cache(bank, data, Path(tempfile.mkdtemp()) / f'k{K}.kdc', splits='train', progress=False, verbose=False)
        seed_everything(0)
        student = create_model('resnet_s', 10, 1).to(dev); opt = torch.optim.AdamW(student.parameters(), 1e-3)
        dl = TensorLoader(data, 'train', 128, device=dev, drop_last=True)
        def run(mode):
            t = time.perf_counter()
            for x, y, idx in dl:
                if mode == 'cached': tl = [v.logits for v in cache.lookup(idx, device=dev).values()]
                elif mode == 'online':
                    with torch.inference_mode(): tl = [v.logits.clone() for v in bank(x).values()]
                out = student(x).logits
                loss = F.cross_entropy(out, y)
                if mode != 'alone':
                    p = torch.stack([l.float().div(4).softmax(-1) for l in tl]).mean(0)
                    loss = loss + F.kl_div(out.div(4).log_softmax(-1), p, reduction='batchmean') * 16
                opt.zero_grad(); loss.backward(); opt.step()
            if dev.type == 'cuda': torch.cuda.synchronize()
            return time.perf_counter() - t
        run('alone')                                         # warm-up
        t = {m: [] for m in ('alone', 'cached', 'online')}
        for r in range(args.reps):
            for m in (('alone', 'cached', 'online') if r % 2 == 0 else ('online', 'cached', 'alone')): t[m].append(run(m))
        res[K] = {m: statistics.median(v) for m, v in t.items()}
    return res


def build_vs_forward(args, dev):
    data = load_data('digits')
    bank = TeacherBank.from_zoo(('resnet_t', 'vit_t'), data, device=dev)
    rows = torch.as_tensor(np.sort(np.concatenate([data.splits[s] for s in data.splits])))
    def forward():
        t = time.perf_counter()
        for i in range(0, len(rows), 256): bank(data.normalize(data.images[rows[i:i + 256]]))
        return time.perf_counter() - t
    def build():
        p = Path(tempfile.mkdtemp()) / 'b.kdc'
        t = time.perf_counter(); build_cache(bank, data, p, chunk_size=256, progress=False, verbose=False)
        return time.perf_counter() - t
    forward()
    f, b = [], []
    for r in range(args.reps): f.append(forward()); b.append(build())
    return statistics.median(b), statistics.median(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--images', type=int, default=5000); p.add_argument('--size', type=int, default=224)
    p.add_argument('--mem-images', type=int, default=5000); p.add_argument('--mem-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2); p.add_argument('--reps', type=int, default=3)
    p.add_argument('--device', default='auto'); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--dir', default=None, help='where the generated images go (default: a temp folder; reused if given)')
    p.add_argument('--memory-child', nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        root, size, w = args.memory_child; return _memory_child(root, int(size), int(w))
    if args.threads: torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix='kdnb-bench-data-'))
    print(f"kdnb data bench: device {dev}, {args.workers} workers, images under {tmp}", flush=True)
    ld, lim, n = throughput(args, tmp)
    print(f"1. loader throughput, {n} JPEGs at {args.size} px: StreamLoader {ld:.0f} img/s, decode limit {lim:.0f} img/s "
          f"-> ratio {ld / lim:.3f} (goal >= 0.90)", flush=True)
    mem = memory(args, tmp)
    a, b = sorted(mem)
    print(f"2. peak RSS of one streamed epoch ({args.mem_size} px, main + workers): {a} images {mem[a]:.0f} MB, {b} images "
          f"{mem[b]:.0f} MB -> growth {100 * (mem[b] / mem[a] - 1):+.1f} % (goal <= 10 %)", flush=True)
    res = cached_vs_alone(args, dev)
    print("3. epoch time, cached K teachers / student alone (goal <= 1.05 for every K); online beside it:")
    for K, r in res.items():
        print(f"   K={K}: alone {r['alone']:.3f} s, cached {r['cached']:.3f} s -> ratio {r['cached'] / r['alone']:.3f}; "
              f"online {r['online']:.3f} s (online / alone {r['online'] / r['alone']:.2f})", flush=True)
    bt, ft = build_vs_forward(args, dev)
    print(f"4. cache build {bt:.3f} s / teachers' own forward {ft:.3f} s over the same samples -> ratio {bt / ft:.3f} (goal <= 1.10)")


if __name__ == '__main__': main()
