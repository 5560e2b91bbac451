"""Score a Spark DataFrame with a bundle: data too big for one machine.

    from service.spark import score_dataframe

    scored = score_dataframe(spark.read.parquet("s3://lake/day=2026-11-28/"), "models/payments")
    scored.write.parquet("s3://lake/scores/day=2026-11-28/")

The output is the input plus ``score``, ``is_anomaly``, ``percentile``, ``unusual`` and
``error``, as the bulk CLI writes them. Partitions are scored
with ``mapInArrow``: each Arrow batch goes through :class:`service.api.Model` (the library behind
the bulk CLI, so a row scores the same here and there), and each Python worker loads the bundle
once and keeps its onnxruntime session for the tasks that follow. The bundle is checked on the
driver, before any task runs (a missing column fails there with the bulk CLI's message), and
shipped to the executors with ``SparkContext.addFile`` unless ``shared=True`` says that its
path is readable from every executor. Executors need this package's ``serve`` and ``batch``
extras (docs/spark.md says how to ship them); pyspark is not a dependency of ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.api import OUTPUTS, Model, SchemaError, check_schema, resolve, score_type_of

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

_models: dict[str, Model] = {}  # per Python worker: bundle path -> loaded model


def _model(path: str, threads: int) -> Model:
    model = _models.get(path)
    if model is None:
        model = _models[path] = Model.load(path, threads=threads)
    return model


def score_dataframe(
    df: DataFrame,
    model_path: str | os.PathLike[str],
    *,
    score_type: str | None = None,
    shared: bool = False,
    threads: int = 1,
) -> DataFrame:
    """``df`` plus the score columns; raises SchemaError (on the driver) if ``df`` lacks a
    column the model needs or already has a column named like a score column."""
    from pyspark import SparkFiles
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    bundle = resolve(model_path)  # verified here, on the driver
    st = score_type_of(bundle.manifest, score_type)
    check_schema(bundle.manifest, df.columns)
    taken = [c for c in OUTPUTS if c in df.columns]
    if taken:
        raise SchemaError(f"the data already has column(s) {taken}; rename them first")
    path = str(bundle.path)
    if not shared:
        df.sparkSession.sparkContext.addFile(path, recursive=True)
    name = Path(path).name
    schema = StructType(
        [
            *df.schema.fields,
            # a row that cannot be scored has no score and says why in ``error``
            StructField("score", DoubleType(), True),
            StructField("is_anomaly", BooleanType(), True),
            StructField("percentile", DoubleType(), True),
            StructField("unusual", StringType(), True),
            StructField("error", StringType(), True),
        ]
    )

    def score_batches(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        model = _model(path if shared else SparkFiles.get(name), threads)
        for batch in batches:
            result = model.score(batch.to_pandas(), score_type=st)
            types = [pa.float64(), pa.bool_(), pa.float64(), pa.string(), pa.string()]
            scores = [
                pa.array(result[c], type=t, from_pandas=True)
                for c, t in zip(OUTPUTS, types, strict=True)
            ]
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, *scores], names=[*batch.schema.names, *OUTPUTS]
            )

    return df.mapInArrow(score_batches, schema)


def run_job(
    model_path: str | os.PathLike[str],
    data: str,
    out: str,
    *,
    master: str | None = None,
    score_type: str | None = None,
) -> tuple[int, int]:
    """``vae-anomaly score --engine spark``: read ``data`` (a file, folder or glob of Parquet,
    CSV with a header, or JSON Lines, by extension), write the scored rows to ``out`` as
    Parquet (a folder of part files), return (rows, anomalies)."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("vae-anomaly score")
    if master:
        builder = builder.master(master)
    spark = builder.getOrCreate()
    try:
        kind = _format_of(data)
        reader = spark.read
        df = (
            reader.parquet(data)
            if kind == "parquet"
            else reader.csv(data, header=True, inferSchema=True)
            if kind == "csv"
            else reader.json(data)
        )
        scored = score_dataframe(df, model_path, score_type=score_type).cache()
        scored.write.mode("errorifexists").parquet(out)
        counts = scored.groupBy("is_anomaly").count().collect()
        by = {bool(r["is_anomaly"]): int(r["count"]) for r in counts}
        return sum(by.values()), by.get(True, 0)
    finally:
        spark.stop()


def _format_of(data: str) -> str:
    """The format of a file, folder or glob: by the extension of the path, or of the files in
    the folder."""
    p = Path(data)
    names = [p.name] if not p.is_dir() else [c.name for c in p.iterdir() if c.is_file()]
    for ext, kind in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv")):
        if any(n.endswith(ext) for n in names):
            return kind
    if any(n.endswith((".jsonl", ".ndjson", ".json")) for n in names):
        return "json"
    raise SchemaError(f"{data}: no .parquet, .csv or .jsonl files to read")
