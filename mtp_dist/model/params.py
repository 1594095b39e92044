"""The parameter table: the one place that knows what each parameter is called and what it is.

Every parameter of an MTPModel has a canonical name, the key a single-process checkpoint stores
it under:

    embed.weight                               the input embedding
    trunk.{k}.{path}                           trunk layer k (path: attn.wq.weight, ...)
    heads.head{i}__{path with __ for .}        output head i (0-based) -- flat, see below
    heads.unembed__norm__weight, ...proj...    the shared final norm and unembedding

The heads' names are flat because `MultiTokenHeads` owns those parameters directly (what lets
DeepSpeed ZeRO-3 gather them around the sequential loss; docs/sequential_heads.md). Those names
are made here and nowhere else.

`ParamTable` lists, for each parameter in construction order, its name, full shape, owner
(embedding, trunk layer k, head i, shared unembedding) and role (the kind of layer that made it:
column / row linear, embedding, unembedding, norm), from which its tensor-parallel split
dimension follows. It is derived from the model itself (`mtp_dist.model.parameter_table` builds
the model on the meta device and reads the roles its layer factory handed out), never kept by
hand. Parallel layouts, the initialisation replay, checkpoint consolidation and the export
formats all read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

# Which dimension of a full weight tensor parallelism splits, by the role of the layer that owns
# it (Megatron-core's convention): column-parallel linears and the vocabulary-parallel
# embedding / unembedding split their output rows, row-parallel linears their input columns;
# norms are replicated.
SPLIT_DIM_BY_ROLE: dict[str, int | None] = {
    "column": 0,
    "row": 1,
    "embedding": 0,
    "unembedding": 0,
    "norm": None,
    "replicated": None,
}
OWNER_KINDS = ("embed", "trunk", "head", "unembed")


@dataclass(frozen=True, order=True)
class Owner:
    """The part of the model a parameter belongs to: `embed`, `trunk` layer k, `head` i
    (0-based; predicts token t + i + 1) or the shared `unembed` (final norm + projection)."""

    kind: str
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in OWNER_KINDS:
            raise ValueError(f"unknown owner kind {self.kind!r}")
        if (self.index is None) != (self.kind in ("embed", "unembed")):
            raise ValueError(
                f"owner {self.kind!r} takes {'no' if self.index is None else 'an'} index"
            )

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind} {self.index}"


def heads_member_name(owner: Owner, path: str) -> str:
    """The flat name under which MultiTokenHeads registers a head's or the unembedding's
    parameter `path` (a path inside a Block or the Unembedding module)."""
    prefix = f"head{owner.index}" if owner.kind == "head" else "unembed"
    return f"{prefix}__{path.replace('.', '__')}"


def canonical_name(owner: Owner, path: str) -> str:
    """The canonical (single-process checkpoint) name of parameter `path` of `owner`'s module."""
    if owner.kind == "embed":
        return f"embed.{path}"
    if owner.kind == "trunk":
        return f"trunk.{owner.index}.{path}"
    return f"heads.{heads_member_name(owner, path)}"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    """Canonical name (see the module docstring)."""
    shape: tuple[int, ...]
    """Full shape (single process; a tensor-parallel rank holds a slice of it)."""
    owner: Owner
    path: str
    """Path inside the owner's module (e.g. `attn.wq.weight`): what other formats map from."""
    role: str
    """The layer kind that made it: a key of SPLIT_DIM_BY_ROLE."""

    @property
    def split_dim(self) -> int | None:
        """Dimension split over tensor-parallel ranks when the owner is tensor-parallel."""
        return SPLIT_DIM_BY_ROLE[self.role]


class ParamTable(Mapping[str, ParamSpec]):
    """Canonical name -> ParamSpec, in the model's construction order."""

    def __init__(self, specs: Iterable[ParamSpec]) -> None:
        self._specs: dict[str, ParamSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"parameter {spec.name} listed twice")
            self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> ParamSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a parameter of this model") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def owned_by(self, kind: str) -> list[ParamSpec]:
        return [s for s in self._specs.values() if s.owner.kind == kind]

    def check_names(self, names: Iterable[str], what: str) -> None:
        """Raise ValueError naming what is missing from / unexpected in `names`."""
        got, want = set(names), set(self._specs)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            raise ValueError(
                f"{what} does not match the model: missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} ({len(missing)}), unexpected "
                f"{extra[:3]}{' ...' if len(extra) > 3 else ''} ({len(extra)})"
            )
