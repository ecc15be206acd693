"""DPSAdamW across 2 processes (gloo, CPU): DDP, FSDP2 (fully_shard, DTensor
parameters) with per-tensor thresholds over shards, distributed checkpoints.

Every distributed run is compared, bit for bit, with a single-process run on
the same global batch: each rank takes half of it, and DDP and FSDP2 average
the two halves' gradients as (g0 / 2) + (g1 / 2), which the single-process
run reproduces exactly.
"""
import contextlib
import faulthandler
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dps_fast import DPSAdamW, distributed, param_groups, selection

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
STEPS = 8
STAGE = 2  # steps 1-2 explore, 3-4 exploit, 5-6 explore, 7-8 exploit
STOP = 3  # checkpoint after the first step of an exploitation stage
LR = 1e-2
WATCHDOG_S = 300
MANAGED = ("inp.weight", "hidden.weight", "out.weight")


class Net(nn.Module):
    """Odd sizes: FSDP2 shards rows unevenly (5/5, 5/4, 2/1) and rows are not
    whole bytes of packed mask."""

    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(6, 10), nn.Linear(10, 9), nn.Linear(9, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(F.gelu(self.inp(x)))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def make_optimizer(model, **storage):
    return DPSAdamW(param_groups(model), lr=LR, stage_steps=STAGE, backend="torch", **storage)


# bf16 parameters, bf16 state and stochastic stores: the random bits of each entry of a
# shard are its global index's (dps_fast.rounding), so the shards step as one process
BF16 = dict(state_dtype="bf16", rounding="stochastic", seed=3)


def batch(step, rank=None):
    """The global batch of `step` (8 examples), or rank `rank`'s half of it. The last
    two inputs are always 0, so inp.weight has tied zero scores."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=generator)
    x[:, 4:] = 0
    y = torch.randint(0, 3, (8,), generator=generator)
    if rank is None:
        return x, y
    half = slice(4 * rank, 4 * rank + 4)
    return x[half], y[half]


# ----- without processes -----------------------------------------------------------------

def test_kth_largest_keys_equal_selection_threshold_keys():
    generator = torch.Generator().manual_seed(0)
    scores = []
    for n in (1, 2, 7, 8, 100, 4097):
        scores += [torch.rand(n, generator=generator), torch.randint(0, 4, (n,), generator=generator).float(),
                   torch.zeros(n), torch.full((n,), float("inf")),
                   torch.randn(n, generator=generator) ** 2 * 10.0 ** torch.randint(-40, 30, (n,), generator=generator)]
    for sparsity in (0.0, 0.3, 0.5, 0.99):
        ks = [selection.kept_count(s.numel(), sparsity) for s in scores]
        for score, key in zip(scores, distributed.kth_largest_keys(scores, ks)):
            assert key == selection.threshold_key(score, sparsity), (score, sparsity)
    negative_zero = torch.tensor([-0.0, 0.0, 1.0, -0.0])  # -0.0 counts as 0.0
    assert selection.key_to_score(int(distributed.kth_largest_keys([negative_zero], [3]))) == 0.0
    with_nan = torch.tensor([float("nan"), 1.0, 2.0])  # NaN ranks as -inf
    assert selection.key_to_score(int(distributed.kth_largest_keys([with_nan], [3]))) == -float("inf")


def test_params_swapped_in_place_are_found():
    # accelerate's FSDP2 prepare replaces each group's params list with the sharded parameters
    old, new = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    opt = DPSAdamW([old], stage_steps=1, backend="torch")
    assert opt.mask(old) is None
    opt.param_groups[0]["params"] = [new]
    assert opt.mask(new) is None
    with pytest.raises(ValueError, match="not a parameter"):
        opt.mask(old)


# ----- the single-process run ---------------------------------------------------------

@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: same kernels, same rounding
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def averaged_backward(model, step, dtype=torch.float32):
    """p.grad = (g0 / 2) + (g1 / 2) over the two halves of the batch, as DDP and FSDP2 make it."""
    halves = []
    for rank in range(WORLD):
        model.zero_grad()
        x, y = batch(step, rank)
        F.cross_entropy(model(x.to(dtype)).float(), y).backward()
        halves.append([p.grad.clone() for p in model.parameters()])
    for param, g0, g1 in zip(model.parameters(), *halves):
        param.grad = g0 * 0.5 + g1 * 0.5


def single_process_run(clip, steps=range(1, STEPS + 1), model=None, opt=None, dtype=torch.float32, storage=None):
    """Per step: (masks, params, clip norm) of the single-process run (of a model of `dtype`
    and an optimizer with `storage`, when it makes them)."""
    with one_thread():
        if model is None:
            model = make_model().to(dtype)
            opt = make_optimizer(model, **(storage or {}))
        record = []
        for step in steps:
            averaged_backward(model, step, dtype)
            norm = opt.clip_grad_norm_(clip)
            opt.step()
            named = dict(model.named_parameters())
            record.append(({n: opt.mask(named[n]) for n in MANAGED},
                           {n: p.detach().clone() for n, p in named.items()}, norm))
        return record


# ----- running 2 processes ------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(worker, *args):
    """Run worker(rank, *args) in WORLD processes. Forked where the platform can
    (seconds, against 15 s or more to import torch again in spawned processes on a
    busy machine); the workers use one thread, so no OpenMP pool is used after fork."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_bootstrap, args=(worker, free_port()) + args, nprocs=WORLD, start_method=method)


def _bootstrap(rank, worker, port, *args):
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung worker fails the test, not the suite
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def train(model, opt, steps, rank, clip, record=None, full=lambda t: t, wrapper=None, dtype=torch.float32):
    for step in steps:
        x, y = batch(step, rank)
        opt.zero_grad()
        F.cross_entropy((wrapper or model)(x.to(dtype)).float(), y).backward()
        norm = opt.clip_grad_norm_(clip)
        opt.step()
        if record is not None:
            named = dict(model.named_parameters())
            masks = {n: opt.mask(named[n]) for n in MANAGED}
            record.append(({n: None if m is None else full(m) for n, m in masks.items()},
                           {n: full(p.detach()).clone() for n, p in named.items()}, norm))


# ----- DDP -----------------------------------------------------------------------------

def ddp_worker(rank, out):
    from torch.nn.parallel import DistributedDataParallel
    model = make_model()
    opt = make_optimizer(model)
    record = []
    train(model, opt, range(1, STEPS + 1), rank, clip=1.0, record=record, wrapper=DistributedDataParallel(model))
    torch.save(record, f"{out}/ddp{rank}.pt")
    # bf16 parameters, bf16 state, stochastic stores: every rank draws the same random bits
    model = make_model().to(torch.bfloat16)
    record = []
    train(model, make_optimizer(model, **BF16), range(1, STEPS + 1), rank, clip=1.0, record=record,
          wrapper=DistributedDataParallel(model), dtype=torch.bfloat16)
    torch.save(record, f"{out}/bf16{rank}.pt")
    # DPS-Mix: the same seed on every rank draws the same Mixout masks
    model = make_model()
    opt = DPSAdamW(param_groups(model), lr=LR, stage_steps=STAGE, variant="mix", backend="torch")
    opt.attach_mix(model)
    torch.manual_seed(7)
    record = []
    train(model, opt, range(1, STEPS + 1), rank, clip=1.0, record=record, wrapper=DistributedDataParallel(model))
    torch.save(record, f"{out}/mix{rank}.pt")
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    # a forked worker inherits accelerate's process-wide state from any Trainer the
    # parent ran (tests/test_hf.py): one process, no DDP. Start from scratch.
    AcceleratorState._reset_state(reset_partial_state=True)
    # the same through accelerate (DDP on the CPU); it takes the process group already set up
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    model = make_model()
    opt = make_optimizer(model)
    wrapper, accelerated = accelerator.prepare(model, opt)
    record = []
    for step in range(1, STEPS + 1):
        x, y = batch(step, rank)
        accelerated.zero_grad()
        accelerator.backward(F.cross_entropy(wrapper(x), y))
        norm = opt.clip_grad_norm_(1.0)  # DPSAdamW's own: accelerator.clip_grad_norm_ would clip unmasked gradients
        accelerated.step()
        named = dict(model.named_parameters())
        record.append(({n: opt.mask(named[n]) for n in MANAGED},
                       {n: p.detach().clone() for n, p in named.items()}, norm))
    torch.save(record, f"{out}/accelerate{rank}.pt")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_workers(ddp_worker, str(out))
    return out


@pytest.fixture(scope="module")
def one_process_clipped():
    return single_process_run(clip=1.0)


def assert_same_run(got, want, norm_rtol=1e-5):
    """Records of runs of the same steps (STEPS - len(want) + 1 to STEPS) are equal (the
    clip norms to norm_rtol: over shards they are summed in another order)."""
    assert len(got) == len(want)
    first = STEPS - len(want) + 1
    for step, ((masks, params, norm), (want_masks, want_params, want_norm)) in enumerate(zip(got, want), first):
        for name in MANAGED:
            if want_masks[name] is None:
                assert masks[name] is None, (step, name)
            else:
                assert torch.equal(masks[name], want_masks[name]), f"mask of {name} differs after step {step}"
        for name, param in want_params.items():
            assert torch.equal(params[name], param), f"{name} differs after step {step}"
        torch.testing.assert_close(norm, want_norm, rtol=norm_rtol, atol=0)


@pytest.mark.parametrize("how", ["ddp", "accelerate"])
def test_ddp_masks_and_params_equal_on_every_rank_and_to_one_process(ddp, one_process_clipped, how):
    if how == "accelerate" and not (ddp / "accelerate0.pt").exists():
        pytest.skip("accelerate is not installed")
    ranks = [torch.load(ddp / f"{how}{r}.pt") for r in range(WORLD)]
    assert_same_run(ranks[1], ranks[0])
    assert_same_run(ranks[0], one_process_clipped)
    assert one_process_clipped[2][0]["hidden.weight"] is not None  # the run did exploit


def test_ddp_with_bf16_state_and_stochastic_rounding_equals_one_process(ddp):
    ranks = [torch.load(ddp / f"bf16{r}.pt") for r in range(WORLD)]
    assert_same_run(ranks[1], ranks[0])
    assert_same_run(ranks[0], single_process_run(clip=1.0, dtype=torch.bfloat16, storage=BF16))


def test_ddp_dps_mix_masks_and_params_equal_on_every_rank(ddp):
    ranks = [torch.load(ddp / f"mix{r}.pt") for r in range(WORLD)]
    assert_same_run(ranks[1], ranks[0])
    assert ranks[0][-1][0]["hidden.weight"] is not None


# ----- FSDP2 ---------------------------------------------------------------------------

def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for module in (model.inp, model.hidden, model.out):
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(tensor):
    return tensor.full_tensor()


def fsdp_worker(rank, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}

    # thresholds over shards, on scores with many ties, an empty shard, odd sizes, and other
    # layouts: sharded over dim 1 (tensor parallel), on a 2-D mesh sharded over one of its
    # dimensions and replicated over the other (HSDP-like: only the sharded one is summed over)
    generator = torch.Generator().manual_seed(5)
    wholes = [torch.randint(0, 4, shape, generator=generator).float()
              for shape in ((7, 3), (1, 5), (4097,), (2, 8), (3, 7), (9, 2), (9, 2))]
    wholes.append(torch.rand(33, 3, generator=generator) * 1e-20)
    mesh_2d = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("a", "b"))
    layouts = [(mesh, [Shard(0)])] * 4 + [(mesh, [Shard(1)]), (mesh_2d, [Shard(0), Replicate()]),
                                          (mesh_2d, [Replicate(), Shard(0)]), (mesh, [Shard(0)])]
    scores = [distribute_tensor(w, m, placements) for w, (m, placements) in zip(wholes, layouts)]
    results["thresholds"] = {"wholes": wholes}
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        ks = [selection.kept_count(w.numel(), sparsity) for w in wholes]
        thresholds = [int(distributed.kth_largest_keys([s.to_local()], [k], distributed.shard_groups(s))[0])
                      for s, k in zip(scores, ks)]
        masks = distributed.select_masks(scores, sparsity)
        gathered = [full(distributed.unpacked_mask(s, m)) for s, m in zip(scores, masks)]
        results["thresholds"][sparsity] = (thresholds, gathered)

    # training, with a sharded and a full checkpoint mid-stage
    model = shard(make_model(), mesh)
    try:
        DPSAdamW(param_groups(model), stage_steps=STAGE, variant="mix")
    except ValueError as error:
        results["mix_error"] = str(error)
    try:
        DPSAdamW(param_groups(model), stage_steps=STAGE, state_dtype="8bit")
    except ValueError as error:
        results["eight_bit_error"] = str(error)
    opt = make_optimizer(model)
    record = []
    for steps in (range(1, STOP + 1), range(STOP + 1, STEPS + 1)):
        # max_norm 1e9: clip_grad_norm_ returns the norm over the shards; the factor is 1.0
        train(model, opt, steps, rank, clip=1e9, record=record, full=full)
        if steps.stop == STOP + 1:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=f"{out}/sharded")
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            checkpoint = {"model": get_model_state_dict(model, options=options),
                          "optim": get_optimizer_state_dict(model, opt, options=options)}
            if rank == 0:  # cpu_offload: the full state dict is on rank 0 only
                torch.save(checkpoint, f"{out}/full.pt")
                results["saved_state_keys"] = sorted(checkpoint["optim"]["state"]["hidden.weight"])
            dist.barrier()
    results["run"] = record
    bf16_model = shard(make_model().to(torch.bfloat16), mesh)
    bf16_record = []
    train(bf16_model, make_optimizer(bf16_model, **BF16), range(1, STEPS + 1), rank, clip=1e9, record=bf16_record,
          full=full, dtype=torch.bfloat16)
    results["bf16_run"] = bf16_record
    named = dict(model.named_parameters())
    results["state"] = {
        name: dict(param=(param.placements, param.to_local().shape),
                   state={key: (value.placements, value.to_local().shape) if distributed.is_dtensor(value)
                          else (type(value).__name__, tuple(value.shape)) if isinstance(value, torch.Tensor)
                          else type(value).__name__ for key, value in opt.state[param].items()})
        for name, param in named.items()}

    # resume from each checkpoint in a fresh model (other initial weights) and optimizer
    for kind in ("sharded", "full", "plain"):
        model = shard(make_model(seed=1), mesh)
        opt = make_optimizer(model)
        if kind == "plain":  # a single-process optimizer's own state_dict(), full tensors and masks
            one = make_model()
            one_opt = make_optimizer(one)
            single_process_run(clip=1e9, steps=range(1, STOP + 1), model=one, opt=one_opt)
            results["plain_saved_keys"] = sorted(one_opt.state_dict()["state"][2])
            set_model_state_dict(model, one.state_dict(), options=StateDictOptions(full_state_dict=True))
            opt.load_state_dict(one_opt.state_dict())
        elif kind == "sharded":
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=f"{out}/sharded")
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        else:
            state = torch.load(f"{out}/full.pt")
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, opt, state["optim"], options=options)
        resumed = []
        train(model, opt, range(STOP + 1, STEPS + 1), rank, clip=1e9, record=resumed, full=full)
        results[f"resumed_{kind}"] = resumed
    if rank == 0:
        torch.save(results, f"{out}/fsdp.pt")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_workers(fsdp_worker, str(out))
    return out, torch.load(out / "fsdp.pt")


def test_sharded_threshold_equals_whole_tensor_threshold(fsdp):
    results = fsdp[1]["thresholds"]
    ties_kept = 0
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        thresholds, masks = results[sparsity]
        for whole, threshold, mask in zip(results["wholes"], thresholds, masks):
            assert threshold == selection.threshold_key(whole, sparsity), (whole.shape, sparsity)
            assert torch.equal(mask, selection.select_mask(whole, sparsity)), (whole.shape, sparsity)
            ties_kept += int(mask.sum()) > selection.kept_count(whole.numel(), sparsity)
    assert ties_kept >= 4  # the integer scores tie at the threshold, and all ties are kept


def test_fsdp2_masks_and_params_equal_one_process(fsdp):
    assert_same_run(fsdp[1]["run"], single_process_run(clip=1e9))


def test_fsdp2_with_bf16_state_and_stochastic_rounding_equals_one_process(fsdp):
    """Bit for bit: the shards draw their entries' random bits by their global indices.
    (The unused clip norm, bf16 per shard, is within a bf16 ulp of the whole tensors'.)"""
    want = single_process_run(clip=1e9, dtype=torch.bfloat16, storage=BF16)
    assert_same_run(fsdp[1]["bf16_run"], want, norm_rtol=2 ** -7)
    assert want[-1][0]["hidden.weight"] is not None


def test_fsdp2_refuses_dps_mix(fsdp):
    assert "variant='mix' does not support DTensor" in fsdp[1].get("mix_error", "no error raised")


def test_fsdp2_refuses_8bit_state(fsdp):
    """Block scales over each rank's shard would be a per-rank tensor: refused for now."""
    assert "state_dtype='8bit' does not support DTensor (FSDP2) parameters yet" in fsdp[1].get(
        "eight_bit_error", "no error raised")


def test_fsdp2_optimizer_state_covers_the_local_shard_only(fsdp):
    from torch.distributed.tensor import Shard
    shapes = {name: param.shape for name, param in make_model().named_parameters()}
    for name, info in fsdp[1]["state"].items():
        placements, local_shape = info["param"]
        assert placements == (Shard(0),) and local_shape[0] < shapes[name][0]
        state = info["state"]
        for key in ("exp_avg", "exp_avg_sq") + (("score",) if name in MANAGED else ()):
            assert state[key] == (placements, local_shape), (name, key)
        if name in MANAGED:  # packed bits of the local shard: ceil(local numel / 8) bytes
            assert state["mask"] == ("Tensor", (math.ceil(math.prod(local_shape) / 8),))
        else:
            assert "mask" not in state and "score" not in state


def test_checkpoint_sharded_resume_mid_stage_continues_the_same(fsdp):
    results = fsdp[1]
    # the mask is a per-shard cache, left out and selected again after loading
    assert "mask" not in results["saved_state_keys"] and "score" in results["saved_state_keys"]
    assert_same_run(results["resumed_sharded"], results["run"][STOP:])


@pytest.mark.parametrize("kind", ["full", "plain"])
def test_checkpoint_unsharded_resume_mid_stage_continues_the_same(fsdp, kind):
    # full: get/set_optimizer_state_dict(full_state_dict=True); plain: a single-process
    # run's opt.state_dict() (masks of whole tensors included) into opt.load_state_dict()
    if kind == "plain":
        assert "mask" in fsdp[1]["plain_saved_keys"]
    assert_same_run(fsdp[1][f"resumed_{kind}"], fsdp[1]["run"][STOP:])


@pytest.mark.parametrize("kind", ["sharded", "full"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_of_two_ranks_resumes_one_process(fsdp, kind):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    out, results = fsdp
    model = make_model(seed=1)
    opt = make_optimizer(model)
    if kind == "sharded":  # resharded from 2 ranks to 1 by torch.distributed.checkpoint
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=out / "sharded")
    else:
        state = torch.load(out / "full.pt")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    resumed = single_process_run(clip=1e9, steps=range(STOP + 1, STEPS + 1), model=model, opt=opt)
    assert_same_run(resumed, results["run"][STOP:])
