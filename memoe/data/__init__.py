"""Edit data: one record type, validation, and loaders for every supported source."""

from memoe.data.loaders import (
    DEFAULT_FILES,
    default_data_dir,
    detect_schema,
    load_edit_dataset,
    load_records,
    save_records,
)
from memoe.data.records import (
    EditDataset,
    EditRecord,
    EditRequest,
    LabeledPrompt,
    RecordError,
    check_records,
    validate_record,
)
from memoe.data.synthetic import World, WorldConfig, build_world

__all__ = [
    "DEFAULT_FILES", "EditDataset", "EditRecord", "EditRequest", "LabeledPrompt", "RecordError", "World",
    "WorldConfig", "build_world", "check_records", "default_data_dir", "detect_schema", "load_edit_dataset",
    "load_records", "save_records", "validate_record",
]
