"A small distillation job for the resume and DDP tests: `python distill_job.py OUT [--resume] [--dropout P]` (or under torchrun)."
import argparse, json, sys
import torch, torch.nn as nn
from kdnb.core import Taps, seed_everything
from kdnb.data import load_data
from kdnb.distill import Distiller, kd_objectives

class TinyNet(nn.Module):
    def __init__(self, hidden, dropout=0.0, size=16, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, classes)
    def forward(self, x):
        e = self.body(x); return Taps(logits=self.head(e), embedding=e)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('out'); ap.add_argument('--resume', action='store_true'); ap.add_argument('--dropout', type=float, default=0.0)
    ap.add_argument('--epochs', type=int, default=3); ap.add_argument('--ckpt-every', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data('digits', size=16)
    seed_everything(123); teacher = TinyNet(64)
    seed_everything(0); student = TinyNet(32, a.dropout)
    d = Distiller(student, {'t': teacher}, data, kd_objectives(['t']), epochs=a.epochs, batch_size=64, lr=5e-3, seed=0,
                  deterministic=True, out_dir=a.out, ckpt_every=a.ckpt_every, resume=a.resume, progress=False, log_every=1)
    d.fit()
    res = d.summary('TinyNet(32)')          # collective under DDP: every rank calls it
    if d.rank == 0:
        torch.save(d.student.state_dict(), f"{a.out}/student.pt")
        json.dump(res, open(f"{a.out}/result.json", 'w'), indent=1, default=float)
    if torch.distributed.is_initialized():          # leave the process group cleanly (gloo threads abort the exit otherwise)
        torch.distributed.barrier(); torch.distributed.destroy_process_group()
