"""Markers shared by the tests."""

import pytest

from memoe.data import default_data_dir

#: Tests that read the real benchmark files: they run in CI (``../shared`` lies beside the checkout there) and skip,
#: saying why, on a machine without them.
needs_shared_data = pytest.mark.skipif(not (default_data_dir() / "counterfact.json").is_file(),
                                       reason=f"the shared benchmark files are not at {default_data_dir()} (set MEMOE_DATA_DIR)")
