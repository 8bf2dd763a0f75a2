"""jin_data._arrow: Arrow arrays to and from numpy without pandas, equal to pyarrow's own."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from jin_data._arrow import bool_array, numeric_array, string_array, to_numpy, valid


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64])
def test_numeric_round_trip_equals_pa_array(dtype):
    values = np.arange(-3, 7).astype(dtype)
    built = numeric_array(values)
    assert built.equals(pa.array(values))
    np.testing.assert_array_equal(to_numpy(built), values)
    # A strided (non-contiguous) input is copied, not misread.
    assert numeric_array(values[::2]).equals(pa.array(values[::2]))


def test_bool_and_string_arrays_equal_pa_array():
    keep = np.array([True, False, True, True, False, False, True, False, True, True])
    assert bool_array(keep).equals(pa.array(keep))
    assert string_array(["train", "", "tést"]).equals(pa.array(["train", "", "tést"]))


def test_to_numpy_and_valid_read_slices_and_nulls_like_pyarrow():
    data = pa.array([1.5, None, 3.0, 4.0, None, 6.0, 7.0, 8.0, 9.0, None], pa.float32())
    for part in (data, data.slice(1, 7), data.slice(3, 4)):
        expected_valid = part.is_valid().to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(valid(part), expected_valid)
        filled = part.fill_null(-1.0).to_numpy()
        np.testing.assert_array_equal(to_numpy(part, fill=-1.0), filled)
    flags = pa.array([True, False, None, True, True, False, True, False, False, True])
    part = flags.slice(3, 6)
    np.testing.assert_array_equal(
        to_numpy(part, fill=False), [True, True, False, True, False, False]
    )
    with pytest.raises(ValueError, match="has nulls and no fill"):
        to_numpy(data)


def test_numeric_array_refuses_bools_and_matrices():
    with pytest.raises(ValueError, match="1-D numeric"):
        numeric_array(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="1-D numeric"):
        numeric_array(np.zeros(3, np.bool_))


def test_reading_an_epoch_never_imports_pandas(dataset):
    # pyarrow imports pandas (when installed) on the first pa.array / to_numpy: ~0.15 s of CPU.
    code = (
        "import sys\n"
        "from jin_data import ShardDataset\n"
        f"data = ShardDataset({dataset!r}, batch_size=4, shuffle=True, seed=0, split='train')\n"
        "rows = sum(len(b['id']) for b in data)\n"
        "assert rows > 0, rows\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
