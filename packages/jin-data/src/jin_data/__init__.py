"""jin-data: multimodal Parquet over fsspec, streaming loader, Ray Data adapter, NumberWorld.

``import jin_data`` never imports Ray: the Ray Data path lives in `jin_data.ray_data` and imports
Ray when called.
"""

from jin_data._config import StrictConfig
from jin_data.collate import collate
from jin_data.decode import Decoder
from jin_data.errors import DataError, DecodeError, SampleError, SchemaError, ShardError
from jin_data.manifest import Manifest, ShardInfo, load_manifest, verify_dataset
from jin_data.reader import EpochReport, LoaderConfig, ShardDataset, list_shards
from jin_data.schema import MODALITIES, SCHEMA_VERSION, check_schema, sample_schema
from jin_data.writer import Sample, ShardWriter, write_dataset

__version__ = "0.12.0"

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "DataError",
    "DecodeError",
    "Decoder",
    "EpochReport",
    "LoaderConfig",
    "Manifest",
    "Sample",
    "SampleError",
    "SchemaError",
    "ShardDataset",
    "ShardError",
    "ShardInfo",
    "ShardWriter",
    "StrictConfig",
    "__version__",
    "check_schema",
    "collate",
    "list_shards",
    "load_manifest",
    "sample_schema",
    "verify_dataset",
    "write_dataset",
]
