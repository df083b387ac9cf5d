"""The Arrow schema of a token table and the metadata it carries."""

from __future__ import annotations

import pyarrow as pa
from vqtok.storage.errors import TokenStoreError
from vqtok.storage.meta import META_KEY, TokenMeta

COLUMNS = ("id", "label", "split", "codes")
#: Parquet path of the codes values inside the list column (Parquet's compliant LIST layout).
CODES_LEAF = "codes.list.element"


def codes_type(meta: TokenMeta) -> pa.DataType:
    # Named "element" because that is what Parquet's LIST layout calls it, so the schema read
    # back equals the schema written.
    item = pa.field("element", pa.from_numpy_dtype(meta.codes_dtype), nullable=False)
    return pa.list_(item, meta.tokens_per_row)


def arrow_schema(meta: TokenMeta) -> pa.Schema:
    """Non-null fields: Parquet then stores no definition levels worth speaking of."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("split", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("codes", codes_type(meta), nullable=False),
        ],
        metadata={META_KEY: meta.to_json()},
    )


def meta_from_schema(schema: pa.Schema, where: object) -> TokenMeta:
    """Metadata of a token table, after checking its columns can be what vqtok wrote."""
    raw = (schema.metadata or {}).get(META_KEY.encode())
    if raw is None:
        raise TokenStoreError(
            where, f"no '{META_KEY}' in the Parquet schema metadata; not a vqtok token file"
        )
    meta = TokenMeta.from_json(raw, where=where)
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise TokenStoreError(
            where, f"missing column(s) {', '.join(missing)}; not a vqtok token file"
        )
    expected = {"id": pa.int64(), "label": pa.int32(), "codes": codes_type(meta)}
    for name, want in expected.items():
        got = schema.field(name).type
        if not got.equals(want):
            raise TokenStoreError(
                where,
                f"column {name} is {got} but the metadata (codebook {meta.codebook_size}, grid "
                f"{meta.grid_h}x{meta.grid_w}) needs {want}; the file is corrupt or was rewritten "
                "by another tool",
            )
    return meta
