"""ORM tables (SQLAlchemy 2.0 declarative). The schema's history lives in Alembic migrations
(``alforge/storage/migrations``); a test checks the two agree.

Arrays are BLOBs of raw bytes (see :mod:`alforge.storage.arrays`); small dictionaries (configs,
metrics, provenance) are JSON text.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    #: running | paused | finished | failed (a crash; the message is its one-line summary) | interrupted
    status: Mapped[str] = mapped_column(String(20), default="running")
    status_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Iteration(Base):
    __tablename__ = "iterations"
    __table_args__ = (UniqueConstraint("campaign_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    #: set once all of this iteration's MD frames are stored (exploration is all-or-nothing)
    explored: Mapped[bool] = mapped_column(Boolean, default=False)
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Structure(Base):
    __tablename__ = "structures"
    __table_args__ = (UniqueConstraint("campaign_id", "hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), index=True)
    hash: Mapped[str] = mapped_column(String(64))
    #: seed | candidate | test
    role: Mapped[str] = mapped_column(String(20), index=True)
    #: where it came from: import | generate | md | embedding ...
    source: Mapped[str] = mapped_column(String(40))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("structures.id"), nullable=True)
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iterations.id"), nullable=True, index=True)
    provenance_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    n_atoms: Mapped[int] = mapped_column(Integer)
    formula: Mapped[str] = mapped_column(String(200))
    numbers: Mapped[bytes] = mapped_column(LargeBinary)
    positions: Mapped[bytes] = mapped_column(LargeBinary)
    cell: Mapped[bytes] = mapped_column(LargeBinary)
    pbc: Mapped[str] = mapped_column(String(3))
    info_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    arrays_npz: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("structure_id", "calculator", "params_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id", ondelete="CASCADE"), index=True)
    calculator: Mapped[str] = mapped_column(String(200))
    params_hash: Mapped[str] = mapped_column(String(64))
    #: pending | running | done | failed
    status: Mapped[str] = mapped_column(String(20), index=True, default="pending")
    failure_class: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    energy: Mapped[float | None] = mapped_column(Float, nullable=True)
    forces: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    stress: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    wall_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    code_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: who computes a ``running`` label: the lease owner that claimed it, until ``claim_expires_at``
    #: (renewed with the owner's lease heartbeat); another run re-runs it only once the claim expired
    #: or the owner holds no live lease
    claim_owner: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    claim_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("campaign_id", "iteration_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), index=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"))
    #: a unique file name, never replaced; ``sha256`` is its content's hash, checked before every load
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    #: int64 bytes: the exact structure ids the model was trained on
    train_ids: Mapped[bytes] = mapped_column(LargeBinary)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Feature(Base):
    __tablename__ = "features"
    __table_args__ = (UniqueConstraint("structure_id", "model_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    structure_id: Mapped[int] = mapped_column(ForeignKey("structures.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    #: last_layer | invariant | ...
    kind: Mapped[str] = mapped_column(String(40))
    dtype: Mapped[str] = mapped_column(String(10))
    shape: Mapped[str] = mapped_column(String(40))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Selection(Base):
    __tablename__ = "selections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id", ondelete="CASCADE"), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    selector: Mapped[str] = mapped_column(String(80))
    params_json: Mapped[str] = mapped_column(Text)
    #: int64 bytes: candidate structure ids considered; picked ids in pick order; float64 scores
    candidate_ids: Mapped[bytes] = mapped_column(LargeBinary)
    picked_ids: Mapped[bytes] = mapped_column(LargeBinary)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    info_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LabelAttempt(Base):
    """Every labelling attempt, kept forever: what ran, how it failed, what the policy decided."""

    __tablename__ = "label_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    #: None for the attempt that succeeded
    failure_class: Mapped[str | None] = mapped_column(String(40), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    wall_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: the labeller kwargs of this attempt (secrets only as unresolved "$env:NAME" references)
    kwargs_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: retry | give_up | quarantine after a failure
    decision: Mapped[str | None] = mapped_column(String(20), nullable=True)
    decision_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CommitteeMember(Base):
    """An extra model of a committee (query by committee): same data as ``model_id``, another seed."""

    __tablename__ = "committee_members"
    __table_args__ = (UniqueConstraint("model_id", "member"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    member: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelHessian(Base):
    """A model's last-layer Hessian ``H`` (METHODS §2), computed once per (model, form) and kept.

    ``form``: ``loss`` (energy + forces + stress rows of the trained loss) or ``energy``. ``matrix``:
    the full ``H`` including ``ς² I`` as raw bytes (:mod:`alforge.storage.arrays`); ``regularizer``
    is ``ς``, ``regularizer_method`` how it was chosen, ``weights_json`` the row weights.
    """

    __tablename__ = "model_hessians"
    __table_args__ = (UniqueConstraint("model_id", "form"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    form: Mapped[str] = mapped_column(String(40))
    dtype: Mapped[str] = mapped_column(String(10))
    shape: Mapped[str] = mapped_column(String(40))
    matrix: Mapped[bytes] = mapped_column(LargeBinary)
    regularizer: Mapped[float] = mapped_column(Float)
    regularizer_method: Mapped[str] = mapped_column(Text)
    weights_json: Mapped[str] = mapped_column(Text)
    n_structures: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CampaignLease(Base):
    """The one owner of a campaign: taken atomically, renewed by a heartbeat, released on exit.

    A lease whose ``expires_at`` passed, or whose ``pid`` is dead on ``host``, belongs to a run that
    is gone and is taken over (see :mod:`alforge.ownership`).
    """

    __tablename__ = "campaign_leases"

    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(36))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConfigVersion(Base):
    """Every configuration a campaign ran with, oldest first: never overwritten, so a result can be
    traced to the settings it came from. ``changes_json`` lists what differs from the version before
    (``[{"field", "old", "new"}]``); ``calculator``/``params_hash`` is the labeller identity."""

    __tablename__ = "campaign_configs"
    __table_args__ = (UniqueConstraint("campaign_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text)
    changes_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    calculator: Mapped[str | None] = mapped_column(String(200), nullable=True)
    params_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingEpoch(Base):
    """One epoch of a model's training (``epoch`` counts from 1): the mean training loss and the
    validation errors of the EMA weights (None without a validation split) and the epoch's wall time
    (the first one's includes building the model and its data), so a slow or diverging training can
    be read back after the fact (``alforge status --json``)."""

    __tablename__ = "training_epochs"
    __table_args__ = (UniqueConstraint("model_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    valid_energy_rmse_per_atom: Mapped[float | None] = mapped_column(Float, nullable=True)
    valid_forces_rmse: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)


class TrainingErrors(Base):
    """A model's per-sample training errors over its epochs (METHODS §7, LTAU), one row per model.

    ``structure_ids`` (int64 bytes) are the training split in row order and ``atom_counts`` (int64
    bytes) their sizes, so force rows map to atoms. ``forces`` (n_atoms × columns) and ``energy``
    (n_structures × columns) are raw ``dtype`` bytes (:mod:`alforge.storage.arrays`); ``form`` says
    what the columns are: ``epochs`` (the log itself, one column per epoch) or ``quantiles`` (each
    sample's error quantiles over its ``n_epochs`` epochs, see
    :func:`alforge.uncertainty.ltau.summarize_error_log`). ``forces_last``/``energy_last`` are the
    final epoch's errors (the default LTAU tolerance is their mean).
    """

    __tablename__ = "training_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), unique=True)
    form: Mapped[str] = mapped_column(String(20))
    n_epochs: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(10))
    structure_ids: Mapped[bytes] = mapped_column(LargeBinary)
    atom_counts: Mapped[bytes] = mapped_column(LargeBinary)
    forces_shape: Mapped[str] = mapped_column(String(40))
    forces: Mapped[bytes] = mapped_column(LargeBinary)
    energy_shape: Mapped[str] = mapped_column(String(40))
    energy: Mapped[bytes] = mapped_column(LargeBinary)
    forces_last: Mapped[bytes] = mapped_column(LargeBinary)
    energy_last: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuxModel(Base):
    """A small model trained on a backbone model's features (``kind``: ``probe``, ``probe_forces``:
    METHODS §6), one per (model, kind). Like model files, its file is never replaced and is loaded
    only after its SHA-256 matches ``sha256``; ``backbone_sha256`` is the backbone file's hash it
    was trained on, ``params_json`` its training settings, ``metrics_json`` its training record."""

    __tablename__ = "aux_models"
    __table_args__ = (UniqueConstraint("model_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    backbone_sha256: Mapped[str] = mapped_column(String(64))
    params_json: Mapped[str] = mapped_column(Text)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
