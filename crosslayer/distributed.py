"""Data- and latent-parallel training on torch.distributed: the few collectives the trainer needs.

Method (EleutherAI sparsify's DDP and its tensor-parallel branch; OpenAI sparse_autoencoder's latent
sharding, Gao et al. 2024 App. D; design.md "Scale"):
1. Mesh: ``world = data x latent`` ranks; rank r sits at data index r // latent and latent index r % latent.
   Ranks with the same data index form a latent group (different slices of the features, the same rows);
   ranks with the same latent index form a data group (the same slice, different rows). gloo on CPU, nccl
   on CUDA; ``torchrun`` sets the environment (:func:`init_mesh`).
2. Data parallel: the global batch of B rows is the single-process stream's batch (same seed); data rank i
   trains on its rows [i B / n, (i + 1) B / n) (the store reads only those:
   ``ActivationStore.iter_batches(part=(i, n))``). The loss is a mean over rows, so the mean of the ranks'
   gradients (one all_reduce per parameter) is the whole batch's gradient; every rank applies the same Adam
   step and the replicas stay equal. What is not a mean over rows is reduced over the data group too: the
   latents that fired (OR, hence the dead-latent counters and AuxK), the calibration batch of step 0
   (all_gather), and BatchTopK's batch selection and thresholds (the global B k-th score is among the union
   of every rank's local top B k scores: :func:`top_values`).
3. Latent parallel (TopK crosscoders, :class:`ShardedCrosscoder`): latent rank j holds features
   [j F / m, (j + 1) F / m) of W_enc, W_dec and b_enc (b_dec is replicated). Each rank encodes its slice and
   keeps its local top k (and AuxK's top k_aux dead latents); the candidates' scores are all_gathered and every
   rank picks the same global top k among the m k candidates (the global top k is always among them); each
   rank decodes its surviving latents and an all_reduce sums the partial decodes, with the identity as its
   backward (the loss is replicated over the group). The gradient-norm clip sums squared norms over the group.
   A rank holds 1 / m of the dictionary, its gradients and its Adam state.
4. Checkpoints hold the full, unsharded state in the single-process trainer's format (gathered; rank 0 alone
   writes), and the data position counts global batches, so a run resumes on any number of ranks and any
   mesh; the finished dictionary is saved once, by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from crosslayer.crosscoder import Crosscoder, _output, _SumSquaredError, aux_row_count, sparse_decode, sparse_topk
from crosslayer.errors import CrosslayerError

SHARD_DIM = {"W_enc_FLD": 0, "W_dec": 0, "b_enc": 0}
"""The feature dimension of each sharded parameter of a crosscoder (``b_dec`` is replicated)."""


@dataclass(frozen=True)
class Mesh:
    """This process's place in a data x latent mesh of ``world`` ranks (module docstring, step 1)."""

    rank: int
    world: int
    latent_size: int
    """Ranks that share one dictionary's features (1: data parallel only)."""
    data_group: object
    """Process group of the ranks with this rank's latent index (None when it has one rank)."""
    latent_group: object
    """Process group of the ranks with this rank's data index (None when it has one rank)."""
    device: str
    """This rank's device (``cuda:<local rank>`` on GPUs)."""

    @property
    def data_size(self) -> int:
        return self.world // self.latent_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.latent_size

    @property
    def latent_rank(self) -> int:
        return self.rank % self.latent_size

    @property
    def writer(self) -> bool:
        """Rank 0 writes checkpoints and the finished dictionary."""
        return self.rank == 0


def init_mesh(device: str = "cpu", latent: int = 1) -> Mesh | None:
    """The mesh of this process: None for one process without latent sharding; else the process group is
    initialised from torchrun's environment (if not already), gloo on CPU and nccl on CUDA, and the data and
    latent groups are built (every rank builds every group, in the same order)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and latent == 1:
        return None
    if latent < 1 or world % latent:
        raise CrosslayerError(f"--latent-parallel {latent} must divide the number of processes ({world}); launch "
                              "several with --nproc N or torchrun --nproc_per_node N")
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, data_size = dist.get_rank(), world // latent
    latent_groups = [_group([d * latent + j for j in range(latent)]) for d in range(data_size)]
    data_groups = [_group([d * latent + j for d in range(data_size)]) for j in range(latent)]
    return Mesh(rank, world, latent, data_groups[rank % latent], latent_groups[rank // latent], str(device))


def _group(ranks: list[int]):
    group = dist.new_group(ranks)  # collective: every rank calls it for every group
    return group if len(ranks) > 1 else None


# ----------------------------------------------------------------------------- collectives

def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather(t: Tensor, group, dim: int = 0) -> Tensor:
    """Every rank's ``t`` (same shape) concatenated along ``dim``, in rank order of ``group``."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def all_reduce_(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def top_values(values_N: Tensor, n: int, group) -> Tensor:
    """The ``n`` largest of the union of every rank's ``values_N`` (descending; padded with -inf when the union
    has fewer): each rank's own top n are enough to find them."""
    local = values_N.reshape(-1).topk(min(n, values_N.numel())).values
    padded = local.new_full((n,), -torch.inf)
    padded[:local.numel()] = local
    return all_gather(padded, group).topk(n).values if group is not None else padded


def global_min(value: Tensor, group) -> Tensor:
    """The smallest ``value`` over ``group`` (a 0-d tensor; +inf stands for "none here")."""
    return all_reduce_(value.clone(), group, dist.ReduceOp.MIN)


class _SumAcross(torch.autograd.Function):
    """all_reduce-sum of the partial decodes of a latent group; backward: the identity (every rank computes the
    same, replicated loss from the sum, so each partial's gradient is the sum's)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ----------------------------------------------------------------------------- what the trainer calls

def rows_of(x_BLD: Tensor, mesh: Mesh | None) -> Tensor:
    """This data rank's part of a global batch (module docstring, step 2)."""
    if mesh is None or mesh.data_size == 1:
        return x_BLD
    lo, hi = batch_part(x_BLD.shape[0], mesh)
    return x_BLD[lo:hi]


def batch_part(batch_size: int, mesh: Mesh | None) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that this data rank trains on."""
    n = 1 if mesh is None else mesh.data_size
    if batch_size % n:
        raise CrosslayerError(f"batch size {batch_size} is not divisible by the {n} data-parallel ranks; "
                              "choose a multiple")
    i = 0 if mesh is None else mesh.data_rank
    return i * batch_size // n, (i + 1) * batch_size // n


def global_rows(x_BLD: Tensor, mesh: Mesh | None) -> int:
    """Rows of the global batch whose part ``x_BLD`` is."""
    return x_BLD.shape[0] * (1 if mesh is None else mesh.data_size)


def gather_rows(x_BLD: Tensor, mesh: Mesh | None) -> Tensor:
    """The whole global batch from every data rank's part (step 0's calibration sample)."""
    return x_BLD if mesh is None else all_gather(x_BLD, mesh.data_group)


def prepare(model: nn.Module, mesh: Mesh | None) -> nn.Module:
    """The module this rank trains: ``model`` itself (data parallel; BatchTopK told its data group), or its
    feature slice (:class:`ShardedCrosscoder`) when the mesh has a latent dimension."""
    if mesh is None:
        return model
    if mesh.latent_size > 1:
        return ShardedCrosscoder(model, mesh)
    if isinstance(model, Crosscoder):
        model.data_group = mesh.data_group
    return model


def reduce_grads_(model: nn.Module, mesh: Mesh | None) -> None:
    """Average every gradient over the data group (the whole batch's gradient; module docstring, step 2)."""
    if mesh is None or mesh.data_group is None:
        return
    for p in model.parameters():
        if p.grad is not None:
            all_reduce_(p.grad, mesh.data_group).div_(mesh.data_size)


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: Mesh | None) -> None:
    """``torch.nn.utils.clip_grad_norm_``, with the squared norms of sharded parameters summed over the latent
    group (replicated ones counted once)."""
    if not isinstance(model, ShardedCrosscoder):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    sharded = sum(g.pow(2).sum() for name, g in grads.items() if name in SHARD_DIM)
    total = all_reduce_(torch.as_tensor(sharded, device=model.b_dec.device, dtype=torch.float32), mesh.latent_group)
    total = (total + sum(g.pow(2).sum() for name, g in grads.items() if name not in SHARD_DIM)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef)


def fired_anywhere(fired_F: Tensor, mesh: Mesh | None) -> Tensor:
    """The latents (of this rank's slice) that fired on any data rank's rows."""
    if mesh is None or mesh.data_group is None:
        return fired_F
    return all_reduce_(fired_F.to(torch.uint8), mesh.data_group, dist.ReduceOp.MAX).bool()


def mean_over_data(values: Tensor, mesh: Mesh | None) -> Tensor:
    """Mean of ``values`` over the data group (the log row's numbers; the finiteness check of the loss)."""
    if mesh is None or mesh.data_group is None:
        return values
    return all_reduce_(values.detach().clone().float(), mesh.data_group) / mesh.data_size


def dead_fraction(dead_F: Tensor, model: nn.Module, mesh: Mesh | None) -> float:
    """Share of the whole dictionary's latents that are dead (``dead_F`` is this rank's slice when sharded)."""
    if not isinstance(model, ShardedCrosscoder):
        return float(dead_F.float().mean())
    return float(all_reduce_(dead_F.sum(), mesh.latent_group)) / model.cfg.n_features


def barrier(mesh: Mesh | None) -> None:
    if mesh is not None:
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints of any mesh

def full_state(model: nn.Module, optim: torch.optim.Optimizer | None, since_fired_F: Tensor,
               mesh: Mesh | None) -> tuple[dict, dict | None, Tensor]:
    """``(model state, optimiser state, since-fired counters)`` of the whole dictionary, in the format of the
    single-process trainer (sharded: a collective over the latent group, one full tensor at a time, moved to the
    CPU). Without ``optim``, no optimiser state (None)."""
    if not isinstance(model, ShardedCrosscoder):
        return model.state_dict(), None if optim is None else optim.state_dict(), since_fired_F
    group, names = mesh.latent_group, [name for name, _ in model.named_parameters()]

    def full(name: str, t: Tensor) -> Tensor:
        return (all_gather(t, group, SHARD_DIM[name]) if name in SHARD_DIM else t).cpu()

    state = {name: full(name, p.detach()) for name, p in model.named_parameters()}
    state["threshold"] = torch.zeros(())
    optim_state = None if optim is None else optim.state_dict()
    if optim_state is not None:
        optim_state["state"] = {i: {key: full(names[i], v) if key != "step" else v for key, v in s.items()}
                                for i, s in optim_state["state"].items()}
    return state, optim_state, all_gather(since_fired_F, group).cpu()


def load_full_state(model: nn.Module, optim: torch.optim.Optimizer, state: dict, optim_state: dict,
                    since_fired_F: Tensor) -> Tensor:
    """Load a full (single-process format) state into this rank's module and optimiser; returns its slice of
    the since-fired counters."""
    if not isinstance(model, ShardedCrosscoder):
        model.load_state_dict(state)
        optim.load_state_dict(optim_state)
        return since_fired_F
    names = [name for name, _ in model.named_parameters()]
    model.load_state_dict({name: model.local(name, state[name]) for name in names})
    optim_state = {**optim_state, "state": {i: {key: model.local(names[i], v) if key != "step" else v
                                                for key, v in s.items()} for i, s in optim_state["state"].items()}}
    optim.load_state_dict(optim_state)
    return since_fired_F[model.lo:model.hi]


# ----------------------------------------------------------------------------- latent parallel

class ShardedCrosscoder(nn.Module):
    """Features [lo, hi) of a TopK :class:`Crosscoder` on one rank of a latent group (module docstring, step 3):
    the crosscoder's parameters, in its order, sliced along the features. ``loss`` is a collective of the
    latent group and returns the whole reconstruction, the firing of this slice's latents and the global L0."""

    def __init__(self, full: Crosscoder, mesh: Mesh):
        super().__init__()
        cfg, m = full.cfg, mesh.latent_size
        if not isinstance(full, Crosscoder) or cfg.activation != "topk":
            raise CrosslayerError("latent parallelism shards TopK crosscoders; use data parallelism only "
                                  "(--latent-parallel 1) for other activations and dictionary kinds")
        if cfg.n_features % m:
            raise CrosslayerError(f"--width {cfg.n_features} is not divisible by --latent-parallel {m}; "
                                  "choose a multiple")
        self.cfg, self.mesh, self.group = cfg, mesh, mesh.latent_group
        self.lo, self.hi = mesh.latent_rank * cfg.n_features // m, (mesh.latent_rank + 1) * cfg.n_features // m
        self.layers, self.d_model, self.n_layers = full.layers, full.d_model, full.n_layers
        for name, p in full.named_parameters():
            setattr(self, name, nn.Parameter(self.local(name, p.detach())))
        self.register_buffer("read_FL", full.read_FL[self.lo:self.hi].clone(), persistent=False)
        self.register_buffer("write_FL", full.write_FL[self.lo:self.hi].clone(), persistent=False)
        self.register_buffer("writes_L", full.write_FL.any(0), persistent=False)
        self.masked = full.masked

    def local(self, name: str, full_t: Tensor) -> Tensor:
        """This rank's slice of a full parameter (or parameter-shaped state) ``name``: a contiguous copy (fused Adam
        needs contiguous state; a view would keep the whole tensor alive)."""
        part = full_t.narrow(SHARD_DIM[name] % full_t.ndim, self.lo, self.hi - self.lo) if name in SHARD_DIM else full_t
        return part.clone(memory_format=torch.contiguous_format)

    @property
    def n_features(self) -> int:
        """Features of this slice."""
        return self.hi - self.lo

    check_acts = Crosscoder.check_acts
    enc_param, enc_from_saved = Crosscoder.enc_param, Crosscoder.enc_from_saved
    W_enc_masked = Crosscoder.W_enc_masked
    W_dec_masked = Crosscoder.W_dec_masked
    _norm_F = Crosscoder._norm_F

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or max(1, self.d_model // 2)

    @torch.no_grad()
    def calibrate_(self, sample_BLD: Tensor) -> None:
        """:meth:`Crosscoder.calibrate_` for TopK, on this slice: b_dec the sample mean, b_enc so that each latent
        crosses 0 on min(1, 4 k / F) of the sample (F the whole dictionary's width)."""
        rate = min(1.0, 4 * self.cfg.k / self.cfg.n_features)
        self.b_dec.copy_(sample_BLD.mean(0) * self.writes_L[:, None])
        pre_NF = sample_BLD.reshape(sample_BLD.shape[0], -1) @ self.W_enc_masked().reshape(self.n_features, -1).T
        n = pre_NF.shape[0]
        self.b_enc.copy_(-pre_NF.kthvalue(min(n, max(1, round((1 - rate) * n))), dim=0).values)

    def _merge(self, score_BK: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Which of this rank's candidates are among the global top ``k`` scores of the group's candidates
        (``keep_BK`` float 0/1), and the global top-k scores ``[B, k]``."""
        every_BN = all_gather(score_BK, self.group, dim=1)
        top = every_BN.topk(k, dim=1)
        chosen_BN = torch.zeros_like(every_BN, dtype=torch.bool).scatter_(1, top.indices, True)
        K, j = score_BK.shape[1], self.mesh.latent_rank
        return chosen_BN[:, j * K:(j + 1) * K].to(score_BK.dtype), top.values

    def _decode(self, vals_BK: Tensor, idx_BK: Tensor, W_dec_FLD: Tensor) -> Tensor:
        """The group's summed decode (no bias) of every rank's active latents."""
        part = sparse_decode(vals_BK, idx_BK, W_dec_FLD.reshape(self.n_features, -1))
        return _SumAcross.apply(part, self.group).reshape(-1, self.n_layers, self.d_model)

    def loss(self, acts_BLD: Tensor, *, sparsity_coef: float = 0.0, dead_F: Tensor | None = None):
        """:meth:`Crosscoder.loss` for TopK (with AuxK), computed by the latent group (module docstring, step 3)."""
        cfg, (B, L, d) = self.cfg, acts_BLD.shape
        W_dec_FLD = self.W_dec_masked()
        norm_F = self._norm_F(W_dec_FLD)
        n_dead = 0 if dead_F is None else int(all_reduce_(dead_F.sum(), self.group))
        k_aux = min(self.k_aux, n_dead)
        local_aux = min(k_aux, self.n_features)
        vals, idx, aux_vals, aux_idx = (t[0] for t in sparse_topk(
            acts_BLD.reshape(1, B, L * d), self.W_enc_masked().reshape(1, -1, L * d), self.b_enc[None], norm_F[None],
            min(cfg.k, self.n_features), dead_F[None] if local_aux else None, local_aux, aux_row_count(cfg.aux_frac, B)))
        keep, top_BK = self._merge((vals * norm_F[idx]).detach(), cfg.k)
        vals = vals * keep
        recon_BLD = self._decode(vals, idx, W_dec_FLD) + self.b_dec
        zero = norm_F.new_zeros(())
        losses = {"sparsity": zero, "aux": zero, "pre_act": zero}
        if local_aux:
            aux_on = dead_F[aux_idx]
            aux_keep = self._merge(torch.where(aux_on, aux_vals.detach() * norm_F[aux_idx], -torch.inf), k_aux)[0]
            aux_BLD = self._decode(aux_vals * aux_keep, aux_idx, W_dec_FLD)
            resid_BLD = (acts_BLD[:len(aux_BLD)] - recon_BLD[:len(aux_BLD)]).detach()
            losses["aux"] = cfg.aux_coef * min(n_dead / self.k_aux, 1.0) * _SumSquaredError.apply(aux_BLD, resid_BLD)
        active = vals > 0
        fired_F = torch.zeros(self.n_features, dtype=torch.bool, device=idx.device).index_fill_(0, idx[active], True)
        return _output(None, recon_BLD, acts_BLD, losses, fired_F=fired_F, l0=float((top_BK > 0).sum()) / B)
