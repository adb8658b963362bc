"""PROBE: a reliability classifier on a frozen MLIP's per-atom embeddings (METHODS §6, seed 004).

Arrays in, arrays out: per structure, the per-atom invariant embeddings ``h_j`` of the backbone
(``(n, d)``), its predicted energy ``Ê`` and its atom count ``n``. The network is

    atom encoder (3 × Linear, LayerNorm, GELU, dropout) → masked multi-head self-attention
    → [masked mean ‖ masked max ‖ Ê ‖ n] → Linear to the structure embedding (256)
    → classifier MLP (256-128-32-2, LayerNorm, GELU, dropout) → p_reliable

with about 0.57 M parameters at the reference sizes (``in_dim`` 64–128, width 256, 32 heads × 8);
every size is an argument so tests use tiny ones. ``Ê`` and ``n`` enter standardised by their
training-set mean and spread (buffers of the module): raw total energies of −1e4 eV would swamp the
pooled features.

**Attention memory.** Self-attention is exact and over all atoms of a structure, computed in
*query chunks*: a block of queries attends to all keys at a time, at most ``attention_block``
score entries (batch × heads × queries × keys) per block, so a 10⁵-atom periodic cell needs
O(n) memory per block instead of O(n²), and gives the same result as one block (tested). When
gradients are on and there is more than one block, each block is checkpointed (recomputed in the
backward pass) so training does not keep all blocks either. Neighbourhood-restricted attention
would change the model; chunking does not.

**Padding.** Ragged batches are padded; a mask keeps padding out of the keys (−∞ scores), the
pools and the importance, so a structure's outputs are the same alone or in any batch (tested).

**Importance.** ``I_j ∝ Σ_heads Σ_queries A_qj`` over the structure's own atoms, normalised to 1.

**Force variant** (``target="forces"``, the paper's suggested next step for MD): one label per atom,
reliable if that atom's force-error norm is at most the ``percentile`` of the training atoms'; the
head then classifies each attended atom (its features ‖ the structure's mean ‖ Ê ‖ n), and a
structure's ``p_reliable`` is its least reliable atom's.

**Training** (:func:`train_probe`): class-weighted cross-entropy divided by √n (inverse-frequency
weights ``w_c = N / (2 N_c)``, so balanced classes give plain √n-normalised cross-entropy), AdamW,
gradient-norm clip, ReduceLROnPlateau on the validation loss, early stopping to the best
validation state, a seeded 90/10 split. Saved as one file of tensors and plain values
(``torch.load(weights_only=True)``), tied to its backbone by the backbone file's SHA-256.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alforge.mlip.device import resolve_device

__all__ = [
    "PROBE_FORMAT",
    "Probe",
    "ProbeBackboneError",
    "ProbeConfig",
    "ProbeNet",
    "ProbeOutput",
    "load_probe",
    "probe_loss",
    "reliability_labels",
    "train_probe",
]

PROBE_FORMAT = "alforge-probe-1"
Target = Literal["energy", "forces"]


class ProbeBackboneError(ValueError):
    """A probe file used with a backbone model other than the one it was trained on."""


@dataclass(frozen=True)
class ProbeConfig:
    """Sizes of the network (METHODS §6 reference values as defaults) and what it classifies."""

    in_dim: int
    encoder_dims: tuple[int, ...] = (256, 256, 256)
    heads: int = 32
    embedding_dim: int = 256
    classifier_dims: tuple[int, ...] = (128, 32)
    dropout: float = 0.1
    target: Target = "energy"
    #: most score entries (batch × heads × queries × keys) one attention block holds (64 MiB float32)
    attention_block: int = 1 << 24

    def __post_init__(self) -> None:
        if self.in_dim < 1 or not self.encoder_dims or min(self.encoder_dims) < 1:
            raise ValueError(
                f"ProbeConfig: in_dim and encoder_dims must be positive, got {self.in_dim}, {self.encoder_dims}"
            )
        if self.encoder_dims[-1] % self.heads:
            raise ValueError(
                f"ProbeConfig: the attention width {self.encoder_dims[-1]} (last encoder dim) must be a "
                f"multiple of heads={self.heads}"
            )
        if self.target not in ("energy", "forces"):
            raise ValueError(f"ProbeConfig.target must be 'energy' or 'forces', got {self.target!r}")
        if not 0 <= self.dropout < 1 or self.attention_block < 1:
            raise ValueError(
                "ProbeConfig: need 0 <= dropout < 1 and attention_block >= 1, "
                f"got {self.dropout}, {self.attention_block}"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["encoder_dims"], out["classifier_dims"] = list(self.encoder_dims), list(self.classifier_dims)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "ProbeConfig":
        values = dict(values)
        values["encoder_dims"] = tuple(values["encoder_dims"])
        values["classifier_dims"] = tuple(values["classifier_dims"])
        return cls(**values)


def _mlp(dims: Sequence[int], dropout: float, last_plain: bool) -> nn.Sequential:
    """Linear → LayerNorm → GELU → Dropout per layer; the last layer plain when ``last_plain``."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if not (last_plain and k == len(dims) - 2):
            layers += [nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over each structure's atoms, exact, in query blocks (see module doc)."""

    def __init__(self, width: int, heads: int, block: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.block = heads, width // heads, block
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query block: attended values (B, H, q, dh) and Σ_queries A (B, H, n) over real queries."""
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        column_sums = (weights * query_mask[:, None, :, None]).sum(dim=2)
        return torch.einsum("bhqk,bhkd->bhqd", weights, v), column_sums

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, n, width), ``mask`` (B, n) True on real atoms → (attended x, Σ_h Σ_q A_qj (B, n))."""
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        step = max(1, self.block // max(1, b * self.heads * n))
        outputs, importance = [], torch.zeros(b, n, dtype=x.dtype, device=x.device)
        for start in range(0, n, step):
            args = (q[:, :, start : start + step], k, v, mask, mask[:, start : start + step].to(x.dtype))
            if torch.is_grad_enabled() and step < n:
                out, sums = checkpoint(self._attend, *args, use_reentrant=False)
            else:
                out, sums = self._attend(*args)
            outputs.append(out)
            importance = importance + sums.sum(dim=1)
        attended = torch.cat(outputs, dim=2).transpose(1, 2).reshape(b, n, width)
        return self.out(attended), importance


class ProbeNet(nn.Module):
    """The PROBE network; :meth:`forward` returns logits, structure (or atom) embeddings, importance."""

    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        width = config.encoder_dims[-1]
        self.encoder = _mlp((config.in_dim, *config.encoder_dims), config.dropout, last_plain=True)
        self.attention = MaskedSelfAttention(width, config.heads, config.attention_block)
        self.embed = nn.Linear(2 * width + 2, config.embedding_dim)
        self.classifier = _mlp((config.embedding_dim, *config.classifier_dims, 2), config.dropout, last_plain=True)
        # standardisation of Ê and n, set from the training set by train_probe
        self.register_buffer("scalar_mean", torch.zeros(2))
        self.register_buffer("scalar_std", torch.ones(2))

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h`` (B, n, d) padded embeddings, ``mask`` (B, n), ``energy`` (B,) → ``logits`` (B, 2) or,
        for the force variant, (B, n, 2); ``embedding`` (B, E) or (B, n, E); ``importance`` (B, n)
        summing to 1 over each structure's atoms, 0 on padding."""
        m = mask.to(h.dtype)
        n_atoms = m.sum(dim=1)
        x, column = self.attention(self.encoder(h), mask)
        x = x * m[..., None]
        mean = x.sum(dim=1) / n_atoms[:, None]
        scalars = (torch.stack([energy.to(h.dtype), n_atoms], dim=1) - self.scalar_mean) / self.scalar_std
        importance = column * m / (self.config.heads * n_atoms[:, None])
        if self.config.target == "forces":
            context = torch.cat([mean, scalars], dim=1)[:, None, :].expand(-1, h.shape[1], -1)
            embedding = self.embed(torch.cat([x, context], dim=2))
        else:
            peak = x.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
            embedding = self.embed(torch.cat([mean, peak, scalars], dim=1))
        return self.classifier(embedding), embedding, importance


def pad_batch(
    features: Sequence[np.ndarray], energies: Sequence[float], device: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged per-atom arrays → ``(h (B, n_max, d), mask (B, n_max), energy (B,))`` on ``device``."""
    n_max = max(len(f) for f in features)
    h = torch.zeros(len(features), n_max, features[0].shape[1], dtype=dtype)
    mask = torch.zeros(len(features), n_max, dtype=torch.bool)
    for i, f in enumerate(features):
        h[i, : len(f)] = torch.as_tensor(np.asarray(f), dtype=dtype)
        mask[i, : len(f)] = True
    energy = torch.as_tensor(np.asarray(energies, dtype=np.float64), dtype=dtype)
    return h.to(device), mask.to(device), energy.to(device)


def _check_inputs(features: Sequence[np.ndarray], energies: Sequence[float], in_dim: int | None = None) -> None:
    if len(features) != len(energies):
        raise ValueError(f"PROBE: {len(features)} feature arrays but {len(energies)} energies")
    for i, f in enumerate(features):
        f = np.asarray(f)
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"PROBE: features of structure {i} must be a non-empty (n_atoms, d) array, got {f.shape}")
        if in_dim is not None and f.shape[1] != in_dim:
            raise ValueError(
                f"PROBE: features of structure {i} have dimension {f.shape[1]}, the probe expects {in_dim}"
            )
        if not np.all(np.isfinite(f)):
            raise ValueError(f"PROBE: features of structure {i} contain non-finite values")
    if not np.all(np.isfinite(np.asarray(energies, dtype=np.float64))):
        raise ValueError("PROBE: predicted energies contain non-finite values")


# ---------------------------------------------------------------------------- labels and loss
def reliability_labels(errors: np.ndarray, percentile: float = 50.0) -> tuple[np.ndarray, float]:
    """``(labels, q_p)``: 1 (reliable) where ``error ≤ q_p``, the ``percentile`` of ``errors``."""
    errors = np.abs(np.asarray(errors, dtype=np.float64))
    if errors.size == 0 or not np.all(np.isfinite(errors)):
        raise ValueError("PROBE labels need a non-empty, finite array of training errors")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    threshold = float(np.percentile(errors, percentile))
    return (errors <= threshold).astype(np.int64), threshold


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights ``w_c = N / (2 N_c)`` (1 for a missing class): balanced → (1, 1)."""
    labels = np.asarray(labels)
    counts = np.array([np.sum(labels == c) for c in (0, 1)], dtype=np.float64)
    return np.where(counts > 0, labels.size / (2 * np.maximum(counts, 1)), 1.0)


def probe_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_atoms: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted cross-entropy divided by √n, averaged over the batch's structures.

    Structure variant: ``mean_s w_{y_s} CE_s / √n_s``. Force variant (``logits`` (B, n, 2), ``labels``
    (B, n), ``mask`` the real atoms): ``mean_s Σ_j w_{y_sj} CE_sj / √n_s``, the per-structure atom sum
    normalised like the structure loss so a large cell does not dominate the batch.
    """
    ce = nn.functional.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view(labels.shape)
    per = weights[labels] * ce
    if per.ndim == 2:
        per = (per * mask.to(per.dtype)).sum(dim=1)
    return (per / torch.sqrt(n_atoms.to(per.dtype))).mean()


# ---------------------------------------------------------------------------- the trained probe
@dataclass
class ProbeOutput:
    """Per structure: ``p_reliable`` (S,), ``embedding`` (S, E), ``importance`` (list of (n_s,),
    each summing to 1); the force variant also ``atom_p_reliable`` (list of (n_s,)), and then
    ``p_reliable`` is each structure's minimum and ``embedding`` the atoms' mean."""

    p_reliable: np.ndarray
    embedding: np.ndarray
    importance: list[np.ndarray]
    atom_p_reliable: list[np.ndarray] | None = None


@dataclass
class Probe:
    """A trained PROBE network with what it was trained on: the class boundary ``threshold`` (an
    error in eV, per atom if ``per_atom``), the backbone's SHA-256 and the training record."""

    net: ProbeNet
    threshold: float
    percentile: float
    per_atom: bool
    backbone_sha256: str | None = None
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def config(self) -> ProbeConfig:
        return self.net.config

    def predict(
        self, features: Sequence[np.ndarray], energies: Sequence[float], *, batch_size: int = 64, device: str = "auto"
    ) -> ProbeOutput:
        """Outputs for structures given by their per-atom embeddings and predicted energies."""
        _check_inputs(features, energies, self.config.in_dim)
        device = resolve_device(device)
        net = self.net.to(device).eval()
        p, emb, imp, atom_p = [], [], [], []
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                chunk = features[start : start + batch_size]
                h, mask, e = pad_batch(chunk, energies[start : start + batch_size], device)
                logits, embedding, importance = net(h, mask, e)
                prob = torch.softmax(logits, dim=-1)[..., 1].cpu().numpy()
                importance = importance.cpu().numpy()
                for i, f in enumerate(chunk):
                    n = len(f)
                    imp.append(importance[i, :n].astype(np.float64))
                    if self.config.target == "forces":
                        atom_p.append(prob[i, :n].astype(np.float64))
                        p.append(float(prob[i, :n].min()))
                        emb.append(embedding[i, :n].mean(dim=0).cpu().numpy())
                    else:
                        p.append(float(prob[i]))
                        emb.append(embedding[i].cpu().numpy())
        dim = self.config.embedding_dim
        return ProbeOutput(
            np.asarray(p, dtype=np.float64),
            np.stack(emb).astype(np.float64) if emb else np.empty((0, dim)),
            imp,
            atom_p if self.config.target == "forces" else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write the probe as tensors and plain values only (readable with ``weights_only=True``)."""
        path = Path(path)
        state = {
            "format": PROBE_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "per_atom": bool(self.per_atom),
            "backbone_sha256": self.backbone_sha256,
            "history": self.history,
            "info": self.info,
        }
        torch.save(state, path)
        return path


def load_probe(path: str | Path, backbone_sha256: str | None = None) -> Probe:
    """Read a probe file; with ``backbone_sha256`` refuse one trained on another backbone model."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path} is not an alforge PROBE file (format {PROBE_FORMAT})")
    if backbone_sha256 is not None and state["backbone_sha256"] != backbone_sha256:
        raise ProbeBackboneError(
            f"{path} was trained on the backbone model with SHA-256 {state['backbone_sha256']}, "
            f"not on this one ({backbone_sha256}); train a probe for this model"
        )
    net = ProbeNet(ProbeConfig.from_dict(state["config"]))
    net.load_state_dict(state["state_dict"])
    return Probe(
        net.eval(), state["threshold"], state["percentile"], state["per_atom"], state["backbone_sha256"],
        list(state["history"]), dict(state["info"]),
    )


# ---------------------------------------------------------------------------- training
def _labels(
    target: Target,
    energies: np.ndarray,
    reference_energies: np.ndarray | None,
    force_errors: Sequence[np.ndarray] | None,
    sizes: np.ndarray,
    per_atom: bool,
    percentile: float,
) -> tuple[list[np.ndarray], float]:
    """Per structure its label(s) and the class boundary, from the training errors (METHODS §6)."""
    if target == "forces":
        if force_errors is None or len(force_errors) != len(sizes):
            raise ValueError("PROBE target='forces' needs force_errors: one (n_atoms,) array per structure")
        for i, (f, n) in enumerate(zip(force_errors, sizes)):
            if np.shape(f) != (n,):
                raise ValueError(f"force_errors of structure {i} must have shape ({n},), got {np.shape(f)}")
        flat, threshold = reliability_labels(np.concatenate(force_errors), percentile)
        return np.split(flat, np.cumsum(sizes)[:-1]), threshold
    if reference_energies is None or len(reference_energies) != len(sizes):
        raise ValueError("PROBE target='energy' needs reference_energies: one per structure")
    errors = np.abs(energies - np.asarray(reference_energies, dtype=np.float64))
    labels, threshold = reliability_labels(errors / sizes if per_atom else errors, percentile)
    return list(labels[:, None]), threshold


def train_probe(
    features: Sequence[np.ndarray],
    energies: Sequence[float],
    reference_energies: Sequence[float] | None = None,
    *,
    force_errors: Sequence[np.ndarray] | None = None,
    target: Target = "energy",
    percentile: float = 50.0,
    per_atom: bool = False,
    encoder_dims: tuple[int, ...] = (256, 256, 256),
    heads: int = 32,
    embedding_dim: int = 256,
    classifier_dims: tuple[int, ...] = (128, 32),
    dropout: float = 0.1,
    lr: float = 5e-5,
    weight_decay: float = 1e-4,
    max_epochs: int = 300,
    patience: int = 25,
    batch_size: int = 32,
    valid_fraction: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    backbone_sha256: str | None = None,
) -> Probe:
    """Train a probe on the backbone's training structures (METHODS §6).

    ``features``: per structure the (n, d) invariant embeddings; ``energies``: the backbone's
    predicted energies; ``reference_energies``: the labels' (energy target). The force variant
    takes ``force_errors`` instead: per structure the (n,) norms ``‖F_ref − F̂‖`` per atom. Labels
    come from all given structures' errors; a seeded ``valid_fraction`` of them (at least one, when
    there are two or more) is held out for the plateau scheduler and early stopping, which restores
    the best validation state.
    """
    _check_inputs(features, energies)
    sizes = np.array([len(f) for f in features])
    e_pred = np.asarray(energies, dtype=np.float64)
    labels, threshold = _labels(
        target, e_pred, None if reference_energies is None else np.asarray(reference_energies, np.float64),
        force_errors, sizes, per_atom, percentile,
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    n_valid = int(round(valid_fraction * len(features))) if len(features) > 1 else 0
    n_valid = min(max(n_valid, 1 if valid_fraction > 0 and len(features) > 1 else 0), len(features) - 1)
    valid, fit = order[:n_valid], order[n_valid:]
    config = ProbeConfig(
        in_dim=int(features[0].shape[1]), encoder_dims=tuple(encoder_dims), heads=heads, embedding_dim=embedding_dim,
        classifier_dims=tuple(classifier_dims), dropout=dropout, target=target,
    )
    device = resolve_device(device)
    net = ProbeNet(config)
    scalars = np.stack([e_pred[fit], sizes[fit]], axis=1)
    net.scalar_mean.copy_(torch.as_tensor(scalars.mean(axis=0), dtype=torch.float32))
    net.scalar_std.copy_(torch.as_tensor(np.maximum(scalars.std(axis=0), 1e-6), dtype=torch.float32))
    net.to(device)
    fit_labels = np.concatenate([labels[i] for i in fit])
    weights = torch.as_tensor(class_weights(fit_labels), dtype=torch.float32, device=device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.9, patience=5, min_lr=1e-7)

    def batch_loss(ids: np.ndarray) -> torch.Tensor:
        h, mask, e = pad_batch([features[i] for i in ids], e_pred[ids], device)
        y = torch.zeros(mask.shape if target == "forces" else (len(ids),), dtype=torch.long)
        for k, i in enumerate(ids):
            if target == "forces":
                y[k, : sizes[i]] = torch.as_tensor(labels[i])
            else:
                y[k] = int(labels[i][0])
        logits, _, _ = net(h, mask, e)
        return probe_loss(logits, y.to(device), mask.sum(dim=1), weights, mask)

    history: list[dict] = []
    best, best_loss, stale = copy.deepcopy(net.state_dict()), math.inf, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        total = 0.0
        fit = fit[rng.permutation(len(fit))]
        for start in range(0, len(fit), batch_size):
            ids = fit[start : start + batch_size]
            optimiser.zero_grad()
            loss = batch_loss(ids)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            total += loss.item() * len(ids)
        net.eval()
        with torch.no_grad():
            monitored = (
                sum(float(batch_loss(valid[s : s + batch_size])) * len(valid[s : s + batch_size])
                    for s in range(0, len(valid), batch_size)) / len(valid)
                if len(valid) else total / len(fit)
            )
        scheduler.step(monitored)
        history.append({"epoch": epoch, "train_loss": total / len(fit), "valid_loss": monitored,
                        "lr": optimiser.param_groups[0]["lr"]})
        if monitored < best_loss:
            best, best_loss, stale = copy.deepcopy(net.state_dict()), monitored, 0
        else:
            stale += 1
            if stale >= patience:
                break
    net.load_state_dict(best)
    info = {
        "n_train": int(len(fit)), "n_valid": int(len(valid)), "best_valid_loss": float(best_loss),
        "epochs": len(history), "class_weights": weights.cpu().tolist(),
        "reliable_fraction": float(np.mean(np.concatenate(labels))), "seed": int(seed),
    }
    return Probe(net.cpu().eval(), threshold, float(percentile), bool(per_atom), backbone_sha256, history, info)
