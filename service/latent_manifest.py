"""The manifest's ``explorer`` section: the latent-space files of a bundle and its 2-D map.

A bundle may hold, beside ``model.onnx``, two more ONNX files (written by training/latent.py,
read by service/latent.py):

- ``posterior.onnx``: the scoring graph's inputs (``x_num``, ``x_cat``) -> ``mu`` and ``sigma``
  (float32 ``[N, latent]``, the encoder's posterior N(mu, sigma^2), from the same preprocessing
  as the scoring graph), and the reconstruction at ``mu`` (the outputs below);
- ``decoder.onnx``: ``z`` (float32 ``[N, latent]``, clamped to +-LATENT_CLAMP) -> the
  reconstruction in the records' own units: ``num_mean``, ``num_lo``, ``num_hi`` (per real
  feature: the decoded value and a central 90% range, scaling and log undone), ``bool_p`` (per
  boolean feature: P(true)), ``missing_p`` (per nullable numeric or boolean feature, in x_num
  order: P(missing)), ``cat_p`` (per categorical feature, its categories' probabilities, the
  features one after another). An output whose width would be 0 is left out.

Bundles without the section (older ones) load and serve; the explorer's endpoints say why they
cannot answer. Coordinates only: the map sample holds no record.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POSTERIOR_FILE = "posterior.onnx"
DECODER_FILE = "decoder.onnx"
LATENT_CLAMP = 10.0  # prior N(0, 1): 10 standard deviations out holds every real record
MAX_MAP_POINTS = 2000
RECON_OUTPUTS = ("num_mean", "num_lo", "num_hi", "bool_p", "missing_p", "cat_p")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LatentFile(_Strict):
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    outputs: list[str]


class LatentMap(_Strict):
    """Map coordinates of a latent point z: ``(z - mean) @ components.T``; a map point p is
    the latent point ``mean + p @ components`` (identity when the latent space is 2-D)."""

    kind: Literal["identity", "pca"]
    mean: list[float]
    components: list[list[float]] = Field(min_length=2, max_length=2)
    explained: list[float] = Field(description="share of the latent means' variance per axis")


class MapSample(_Strict):
    """Map coordinates of up to MAX_MAP_POINTS held-out records (no records themselves)."""

    x: list[float]
    y: list[float]
    percentile: list[float] = Field(description="of each point's default score, 0-100")
    label: list[str] | None = None
    label_name: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> MapSample:
        n = len(self.x)
        if len(self.y) != n or len(self.percentile) != n or n > 2 * MAX_MAP_POINTS:
            raise ValueError("x, y and percentile must have one entry per point")
        if self.label is not None and len(self.label) != n:
            raise ValueError("label must have one entry per point")
        return self


class ImageShape(_Strict):
    """The features are a grayscale image: ``pixels`` are column names, row by row (a pixel
    training dropped, constant, is drawn as ``background``)."""

    width: int = Field(ge=1, le=256)
    height: int = Field(ge=1, le=256)
    pixels: list[str]
    background: float = 0.0


class Explorer(_Strict):
    latent: int = Field(ge=1)
    posterior: LatentFile
    decoder: LatentFile
    max_abs_diff: float = Field(ge=0, description="onnxruntime vs torch, both files")
    max_rel_diff: float = Field(ge=0)
    map: LatentMap
    bounds: list[list[float]] = Field(description="[[x_lo, x_hi], [y_lo, y_hi]] of the map")
    sample: MapSample
    image: ImageShape | None = None

    def files(self) -> list[LatentFile]:
        return [self.posterior, self.decoder]
