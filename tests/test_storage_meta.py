"""TokenMeta: JSON round trip, defaults, validation, tokenizer checks."""

import json

import numpy as np
import pytest
from vqtok.storage import TokenMeta, TokenStoreError
from vqtok.storage.meta import STORAGE_FORMAT_VERSION


def make_meta(**overrides):
    fields = dict(
        codebook_size=512,
        grid_h=7,
        grid_w=7,
        dataset="mnist",
        dataset_fingerprint="ab12",
        checkpoint_hash="cd34",
        vqtok_version="0.1.0",
        created_at="2025-01-01T00:00:00+00:00",
        extra={"split_seed": 3, "note": ["a", 1.5]},
    )
    fields.update(overrides)
    return TokenMeta(**fields)


def test_dict_and_json_round_trip():
    meta = make_meta()
    data = meta.to_dict()
    assert data["storage_format"] == STORAGE_FORMAT_VERSION
    assert TokenMeta.from_dict(json.loads(json.dumps(data))) == meta
    assert TokenMeta.from_json(meta.to_json()) == meta


def test_created_at_none_is_resolved_once_to_utc_iso(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    meta = make_meta(created_at=None)
    assert meta.created_at is not None and meta.created_at.endswith("+00:00")
    assert TokenMeta.from_dict(meta.to_dict()).created_at == meta.created_at


def test_source_date_epoch_fixes_the_creation_time(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert make_meta(created_at=None).created_at == "1970-01-01T00:00:00+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(TokenStoreError, match="SOURCE_DATE_EPOCH='yesterday' is not a whole "
                                              "number of seconds; fix or unset it"):
        make_meta(created_at=None)


@pytest.mark.parametrize(
    ("size", "dtype"), [(1, np.uint16), (65536, np.uint16), (65537, np.int32), (1 << 17, np.int32)]
)
def test_codes_dtype_follows_codebook_size(size, dtype):
    assert make_meta(codebook_size=size).codes_dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"codebook_size": 0}, "codebook_size"),
        ({"codebook_size": True}, "codebook_size"),
        ({"grid_h": 2.0}, "grid_h"),
        ({"dataset": None}, "dataset"),
        ({"extra": {"x": object()}}, "JSON"),
        ({"created_at": 5}, "created_at"),
    ],
)
def test_invalid_fields_are_refused(overrides, fragment):
    with pytest.raises(TokenStoreError, match=fragment):
        make_meta(**overrides)


def test_numpy_ints_are_accepted_as_plain_ints():
    meta = make_meta(codebook_size=np.int64(512), grid_h=np.int32(7))
    assert type(meta.codebook_size) is int and type(meta.grid_h) is int
    json.dumps(meta.to_dict())


def test_from_dict_names_missing_keys_and_newer_formats():
    data = make_meta().to_dict()
    del data["checkpoint_hash"]
    with pytest.raises(TokenStoreError, match="checkpoint_hash"):
        TokenMeta.from_dict(data, where="f.parquet")
    newer = make_meta().to_dict() | {"storage_format": STORAGE_FORMAT_VERSION + 1}
    with pytest.raises(TokenStoreError, match="upgrade vqtok"):
        TokenMeta.from_dict(newer)


def test_differences_ignore_created_at_only():
    meta = make_meta()
    assert meta.differences(make_meta(created_at="2030-01-01T00:00:00+00:00")) == []
    assert meta.differences(make_meta(checkpoint_hash="zz", grid_w=8)) == [
        "grid_w",
        "checkpoint_hash",
    ]


def test_check_tokenizer_refuses_a_mismatch():
    meta = make_meta()
    meta.check_tokenizer("cd34", 512, (7, 7))
    with pytest.raises(TokenStoreError, match="checkpoint"):
        meta.check_tokenizer("other")
    with pytest.raises(TokenStoreError, match="codebook of 512"):
        meta.check_tokenizer("cd34", 1024)
    with pytest.raises(TokenStoreError, match="7x7"):
        meta.check_tokenizer("cd34", 512, (8, 8))


def test_error_messages_are_one_line_and_name_the_file():
    error = TokenStoreError("some/file.parquet", "first\nsecond")
    assert str(error) == "some/file.parquet: first second"
    assert error.path == "some/file.parquet"
    assert isinstance(error, ValueError)
