"""The version-1 schema: what conforms, and what is refused with the file and column named."""

import pyarrow as pa
import pytest

from jin_data import SCHEMA_VERSION, SchemaError, check_schema, sample_schema


def test_schema_records_version_and_sizes_in_metadata():
    schema = sample_schema(point_features=2, custom_dim=14)
    assert schema.metadata[b"jin_data.schema_version"] == SCHEMA_VERSION.encode()
    assert schema.field("points").type == pa.list_(pa.list_(pa.float32(), 5))
    assert schema.field("custom").type == pa.list_(pa.float32())  # F=14 lives in the metadata
    info = check_schema(schema, "mem://x")
    assert (info.point_features, info.custom_dim) == (2, 14)


def test_extra_columns_are_allowed():
    schema = sample_schema().append(pa.field("caption_source", pa.string()))
    schema = schema.with_metadata(sample_schema().metadata)
    check_schema(schema, "mem://x")


def test_file_without_version_is_refused_naming_url():
    schema = pa.schema([pa.field("id", pa.string())])
    with pytest.raises(SchemaError, match=r"url='s3://b/f.parquet'.*not a jin-data shard"):
        check_schema(schema, "s3://b/f.parquet")


def test_unknown_version_is_refused():
    schema = sample_schema().with_metadata({b"jin_data.schema_version": b"99"})
    with pytest.raises(SchemaError, match="'99' is not supported; expected '2'"):
        check_schema(schema, "f")


def test_wrong_column_type_names_column_expected_and_received():
    base = sample_schema()
    schema = base.set(base.get_field_index("label"), pa.field("label", pa.string()))
    with pytest.raises(SchemaError) as err:
        check_schema(schema, "f")
    assert err.value.column == "label"
    assert "expected int64, received string" in str(err.value)
