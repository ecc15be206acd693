"""The extra communication of DPSAdamW's sharded selection, measured with 2 CPU
processes (gloo), and the same argued for larger jobs.

    python benchmarks/distributed_cost.py [--hidden 768] [--layers 1] [--repeats 5]

The managed tensors are those of a BERT encoder (per layer: query, key, value,
attention output, intermediate, output; then the pooler and a 2-class
classifier) as fp32 score DTensors sharded over dim 0 like FSDP2 shards them.
At a stage boundary DPSAdamW computes each tensor's threshold over all of its
shards (dps_fast.distributed.select_masks). Measured here, per boundary:

- the payload of every collective it makes (dist.all_reduce counted), and
  the bytes that crossed the loopback interface meanwhile (both ranks' TCP
  traffic, headers included, as /proc/net/dev counts it);
- its time, against the same radix selection on each local shard without
  communication (a per-shard threshold: wrong, but the floor), and against
  gathering the scores to select on the whole tensor (all_gather).

Steps between boundaries add no communication: the update is element-wise on
each rank's shard. Prints a markdown section for benchmarks/RESULTS.md.
"""
import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dps_fast import distributed, selection  # noqa: E402

WORLD = 2
SPARSITY = 0.3


def bert_shapes(hidden, layers):
    per_layer = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    return per_layer * layers + [(hidden, hidden), (2, hidden)]


def loopback_bytes():
    """Bytes sent over the loopback interface so far (None where /proc/net/dev is missing)."""
    try:
        with open("/proc/net/dev") as file:
            for line in file:
                name, _, fields = line.partition(":")
                if name.strip() == "lo":
                    return int(fields.split()[8])  # transmit bytes
    except OSError:
        pass
    return None


class CountingAllReduce:
    """Counts dist.all_reduce calls and their payload bytes (this rank's tensor)."""

    def __init__(self):
        self.calls = self.bytes = 0
        self._all_reduce = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return self._all_reduce(tensor, *args, **kwargs)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = bert_shapes(args.hidden, args.layers)
    generator = torch.Generator().manual_seed(0)
    scores = [distribute_tensor(torch.rand(shape, generator=generator) ** 4, mesh, [Shard(0)], src_data_rank=None)
              for shape in shapes]
    shards = [s.to_local() for s in scores]

    counter = CountingAllReduce()
    dist.all_reduce = counter
    try:
        dist.barrier()
        before = loopback_bytes()
        distributed.select_masks(scores, SPARSITY)
        dist.barrier()
        after = loopback_bytes()
    finally:
        dist.all_reduce = counter._all_reduce

    def per_shard():
        ks = [selection.kept_count(s.numel(), SPARSITY) for s in shards]
        for shard, key in zip(shards, distributed.kth_largest_keys(shards, ks)):
            selection.pack_mask(selection.order_keys(shard) >= key)

    def gathered():
        for score, shard in zip(scores, shards):
            whole = score.full_tensor()  # all_gather of the scores
            key = selection.threshold_key(whole, SPARSITY)
            selection.pack_mask(selection.order_keys(shard) >= key)

    result = dict(
        tensors=len(shapes), entries=sum(s.numel() for s in scores), local_entries=sum(s.numel() for s in shards),
        calls=counter.calls, payload=counter.bytes,
        loopback=None if before is None else after - before,
        sharded=timed(lambda: distributed.select_masks(scores, SPARSITY), args.repeats),
        per_shard=timed(per_shard, args.repeats),
        gathered=timed(gathered, args.repeats))
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out = f"/tmp/dps_distributed_cost_{os.getpid()}.pt"
    mp.start_processes(worker, args=(free_port(), args, out), nprocs=WORLD, start_method="spawn")
    r = torch.load(out)
    os.remove(out)
    per_tensor = r["payload"] // r["tensors"]
    print(f"### Distributed selection cost (2 CPU processes, gloo; `python benchmarks/distributed_cost.py "
          f"--hidden {args.hidden} --layers {args.layers}`)\n")
    print(f"{r['tensors']} managed tensors (BERT, hidden {args.hidden}, {args.layers} layer(s) + pooler + "
          f"classifier), {r['entries'] / 1e6:.1f}M entries, {r['local_entries'] / 1e6:.1f}M per rank; "
          f"sparsity {SPARSITY}; torch {torch.__version__}, 1 thread per process, {os.cpu_count()} cores; "
          f"median of {args.repeats}.\n")
    print("| per stage boundary, per rank | value |")
    print("|---|---|")
    print(f"| all-reduce calls | {r['calls']} ({distributed.PASSES} passes of {distributed.DIGIT_BITS}-bit digits) |")
    print(f"| all-reduce payload | {r['payload']:,} bytes = {per_tensor:,} bytes per tensor "
          f"({distributed.PASSES} x {distributed.BINS} int64 counts) |")
    if r["loopback"] is not None:
        print(f"| loopback bytes sent meanwhile (both ranks, TCP included) | {r['loopback']:,} |")
    gather_bytes = (WORLD - 1) * r["entries"] // WORLD * 4
    print(f"| gathering the scores instead would receive | {gather_bytes:,} bytes (fp32 of the other shards) |")
    print(f"| selection time, thresholds over shards (exact) | {r['sharded'] * 1e3:.1f} ms |")
    print(f"| selection time, per-shard thresholds (no communication; wrong) | {r['per_shard'] * 1e3:.1f} ms |")
    print(f"| selection time, all_gather scores then select | {r['gathered'] * 1e3:.1f} ms |")
    print("\nSteps between boundaries communicate nothing extra (each rank updates its own shard).")


if __name__ == "__main__":
    main()
