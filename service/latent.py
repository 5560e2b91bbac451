"""The latent space of a served model (see service/latent_manifest.py): records -> posterior,
latent or map points -> decoded records, and what the model expected of each scored feature.
Knows nothing of HTTP (service/explorer.py serves it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle import (
    MISSING_INDEX,
    UNKNOWN_INDEX,
    BooleanFeature,
    Bundle,
    BundleError,
    CategoricalFeature,
    NumericFeature,
)
from service.latent_manifest import Explorer
from service.runtime import OnnxModel

MAX_CATEGORIES_SHOWN = 10  # a decoded categorical lists its most likely categories only


def sig(x: float) -> float:
    """4 significant digits: a reconstruction is no more precise than that."""
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class Slot:
    """Where one feature's reconstruction is in the outputs."""

    kind: str
    col: int  # num_*: real column; bool_p: boolean column; cat_p: first category's column
    miss: int | None  # column of missing_p, if the feature may be missing
    categories: list[str] | None = None


class Latent:
    """The posterior and decoder sessions of one bundle, and the map."""

    def __init__(self, bundle: Bundle, section: Explorer, threads: int = 1) -> None:
        self.section = section
        self.features = bundle.manifest.features
        self.posterior, self.decoder = (
            OnnxModel(bundle.path / f.file, sha256=f.sha256, intra_op_threads=threads)
            for f in (section.posterior, section.decoder)
        )
        for sess, want in ((self.posterior, section.posterior), (self.decoder, section.decoder)):
            if sess.output_names != want.outputs:
                raise BundleError(f"{want.file}: outputs {sess.output_names}, not {want.outputs}")
        self.map_mean = np.asarray(section.map.mean, dtype=np.float64)
        self.map_axes = np.asarray(section.map.components, dtype=np.float64)
        d = section.latent
        if self.map_mean.shape != (d,) or self.map_axes.shape != (2, d):
            raise BundleError(f"the latent map does not fit a {d}-D latent space")
        self.slots = feature_slots(self.features)
        self.slot_of = {f.name: s for f, s in zip(self.features, self.slots, strict=True)}

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Posterior ``mu``, ``sigma``, ``map`` coordinates and the reconstruction at mu."""
        out = self.posterior.run(inputs)
        out["map"] = self.to_map(out["mu"])
        return out

    def decode(self, z: np.ndarray) -> dict[str, np.ndarray]:
        return self.decoder.run({"z": np.ascontiguousarray(z, dtype=np.float32)})

    def to_map(self, mu: np.ndarray) -> np.ndarray:
        return np.asarray((mu.astype(np.float64) - self.map_mean) @ self.map_axes.T)

    def from_map(self, points: np.ndarray) -> np.ndarray:
        """The latent point of each map point (on the map's plane through the latent space)."""
        return np.asarray(self.map_mean + points @ self.map_axes)

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Both graphs run on ``inputs`` and give finite outputs of the features' widths."""
        n = len(next(iter(inputs.values())))
        out = self.encode(inputs)
        widths = {"mu": self.section.latent, "sigma": self.section.latent, "map": 2}
        widths.update(output_widths(self.features))
        for name, arr in [*out.items(), *self.decode(out["mu"]).items()]:
            if arr.shape != (n, widths.get(name)):
                raise BundleError(f"latent-space output {name} is {list(arr.shape)} on {n} rows")
            if not np.isfinite(arr).all():
                raise BundleError(f"latent-space output {name} is not finite on warm-up records")

    def records(self, recon: dict[str, np.ndarray]) -> list[list[dict[str, Any]]]:
        """Each row of a reconstruction as a decoded record: per feature its expected value
        (and 90% range), probabilities of booleans, categories and of being missing."""
        rows = {k: v.tolist() for k, v in recon.items()}
        n = len(next(iter(recon.values())))
        pairs = list(zip(self.features, self.slots, strict=True))
        return [[self.decoded_feature(f.name, s, rows, i) for f, s in pairs] for i in range(n)]

    def decoded_feature(
        self, name: str, s: Slot, rows: dict[str, list[Any]], i: int
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "kind": s.kind}
        if s.kind == "numeric":
            out["expected"] = sig(rows["num_mean"][i][s.col])
            out["range"] = [sig(rows["num_lo"][i][s.col]), sig(rows["num_hi"][i][s.col])]
        elif s.kind == "boolean":
            p = rows["bool_p"][i][s.col]
            out.update(expected=p >= 0.5, p=sig(p))
        else:
            probs = rows["cat_p"][i][s.col : s.col + len(s.categories or [])]
            ranked = sorted(range(len(probs)), key=lambda j: -probs[j])
            best = next(j for j in ranked if j != UNKNOWN_INDEX)
            cats = s.categories or []
            out.update(
                expected=None if best == MISSING_INDEX else cats[best],
                p=sig(probs[best]),
                probs=[[cats[j], sig(probs[j])] for j in ranked[:MAX_CATEGORIES_SHOWN]],
            )
        if s.miss is not None:
            out["p_missing"] = sig(rows["missing_p"][i][s.miss])
        return out


def output_widths(features: list[Any]) -> dict[str, int]:
    """The width of each reconstruction output, from the feature schema."""
    n_real = sum(isinstance(f, NumericFeature) for f in features)
    return {
        "num_mean": n_real,
        "num_lo": n_real,
        "num_hi": n_real,
        "bool_p": sum(isinstance(f, BooleanFeature) for f in features),
        "missing_p": sum(f.nullable for f in features if not isinstance(f, CategoricalFeature)),
        "cat_p": sum(len(f.categories) for f in features if isinstance(f, CategoricalFeature)),
    }


def feature_slots(features: list[Any]) -> list[Slot]:
    n_real = sum(isinstance(f, NumericFeature) for f in features)
    nullable = sorted(
        (f.column, f.name) for f in features if f.nullable and f.kind != "categorical"
    )
    miss = {name: i for i, (_, name) in enumerate(nullable)}
    offsets, o = {}, 0
    for f in sorted(
        (f for f in features if isinstance(f, CategoricalFeature)), key=lambda f: f.column
    ):
        offsets[f.name], o = o, o + len(f.categories)
    slots = []
    for f in features:
        if isinstance(f, NumericFeature):
            slots.append(Slot("numeric", f.column, miss.get(f.name)))
        elif isinstance(f, BooleanFeature):
            slots.append(Slot("boolean", f.column - n_real, miss.get(f.name)))
        else:
            slots.append(Slot("categorical", offsets[f.name], None, list(f.categories)))
    return slots


def load(bundle: Bundle, threads: int = 1) -> Latent | None:
    """The bundle's latent space, or None for a bundle without one (trained before it)."""
    section = bundle.manifest.explorer
    return None if section is None else Latent(bundle, section, threads)


class Expected:
    """What the model expected of each feature of one scored batch (all requests coalesced
    by micro-batching share one): the decoder's output at each record's posterior mean.
    Computed when first asked for (a batch nobody explains costs nothing), one posterior run
    and array work per feature for the whole batch."""

    def __init__(self, latent: Latent, inputs: dict[str, np.ndarray]) -> None:
        self.latent, self.inputs = latent, inputs
        self.out: dict[str, np.ndarray] | None = None
        self.columns: dict[str, Column] = {}

    def column(self, name: str) -> Column:
        """(expected value, its range or probability, P(missing)) of every row."""
        col = self.columns.get(name)
        if col is None:
            if self.out is None:
                self.out = self.latent.posterior.run(self.inputs)
            col = self.columns[name] = _column(self.latent.slot_of[name], self.out)
        return col


Column = tuple[list[Any], list[Any] | None, list[float] | None]


def _column(s: Slot, out: dict[str, np.ndarray]) -> Column:
    p_missing = None if s.miss is None else sig_list(out["missing_p"][:, s.miss])
    if s.kind == "numeric":
        mean, lo, hi = (sig_list(out[k][:, s.col]) for k in ("num_mean", "num_lo", "num_hi"))
        return mean, [[a, b] for a, b in zip(lo, hi, strict=True)], p_missing
    if s.kind == "boolean":
        p = out["bool_p"][:, s.col]
        return (p >= 0.5).tolist(), sig_list(np.maximum(p, 1 - p)), p_missing
    cats = s.categories or []
    probs = out["cat_p"][:, s.col : s.col + len(cats)].copy()
    probs[:, UNKNOWN_INDEX] = -1.0  # "never seen" is no expectation
    best = probs.argmax(1)
    names = [None if j == MISSING_INDEX else cats[j] for j in best.tolist()]
    return names, sig_list(np.take_along_axis(probs, best[:, None], 1)[:, 0]), None


def explain(
    expected: tuple[Expected, int] | None,
    tops: list[list[dict[str, Any]]],
    columns: Any,
) -> None:
    """Add to each named feature of ``tops`` (one list per record of a request that starts
    at row ``offset`` of its batch's ``Expected``) the record's ``value`` and what the model
    expected from the rest of the record: ``expected`` with a central 90% ``range``, or the
    expected category or boolean with its probability ``p``; ``p_missing`` when the value is
    missing. Nothing for a bundle without latent files (``expected`` None)."""
    if expected is None or not any(tops):
        return
    batch, offset = expected
    kinds = batch.latent.slot_of
    for i, top in enumerate(tops):
        for t in top:
            name = t["name"]
            value = columns[name][i]
            t["value"] = value.item() if isinstance(value, np.generic) else value
            exp, extra, p_missing = batch.column(name)
            t["expected"] = exp[offset + i]
            if extra is not None:
                t["range" if kinds[name].kind == "numeric" else "p"] = extra[offset + i]
            if value is None and p_missing is not None:
                t["p_missing"] = p_missing[offset + i]


def sig_list(a: np.ndarray) -> list[float]:
    """:func:`sig` of each value: one by one for a few (numpy's calls cost more than such
    rows), as array work for many."""
    if len(a) <= 32:
        return [sig(x) for x in a.tolist()]
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
    scale = 10.0 ** (3 - np.where(np.isfinite(mag), mag, 0))
    return list((np.round(a * scale) / scale).tolist())


def explanation_text(t: dict[str, Any]) -> str:
    """One explained feature as text (bulk scoring's top_features column), e.g.
    ``amount:0.83 (4800; expected 42 in 20..90)`` or ``country:0.4 (RU; expected US p=0.61)``."""
    head = f"{t['name']}:{t['share']:g}"
    if "expected" not in t:
        return head
    exp = t["expected"]
    how = f" in {t['range'][0]:g}..{t['range'][1]:g}" if "range" in t else f" p={t['p']:g}"
    return f"{head} ({t['value']}; expected {exp}{how})"
