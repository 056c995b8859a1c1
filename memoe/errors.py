"""The errors a user can fix, under one root.

Every error memoe raises for bad input (a config key, a record, an adapter that does not fit the model, a model
file that is missing, a name nobody registered) derives from :class:`MemoeError`. The command-line scripts turn
exactly these into one line on stderr and exit code 2 (:func:`memoe.cli.run_cli`); anything else is a bug and
keeps its traceback. Each class also derives from the builtin its callers knew before (``ValueError``,
``KeyError``, ``FileNotFoundError``), so ``except ValueError`` around memoe keeps working.
"""

from __future__ import annotations


class MemoeError(Exception):
    """Root of every error caused by input a user can fix; the message says what and where."""


class ConfigError(MemoeError, ValueError):
    """A bad config key or value; the message names it."""


class LayerError(ConfigError, IndexError):
    """A layer index the model does not have."""


class DataError(MemoeError, ValueError):
    """An edit dataset or request that cannot be used as given (missing file, empty, unknown schema, too few)."""


class MissingFileError(MemoeError, FileNotFoundError):
    """A file the user named (config, dataset, checkpoint, adapter) does not exist."""


class RecordError(DataError):
    """A malformed edit record. The message names the record (case id and index) and the field."""

    def __init__(self, case_id: object, index: int | None, field_name: str, problem: str):
        where = f"record case_id={case_id!r}" + (f" (index {index})" if index is not None else "")
        super().__init__(f"{where}, field {field_name!r}: {problem}")
        self.case_id, self.index, self.field, self.problem = case_id, index, field_name, problem


class AdapterError(MemoeError, ValueError):
    """An adapter that cannot be loaded or attached; the message names the file, key or shape."""


class ModelLoadError(MemoeError, FileNotFoundError):
    """A model source (preset, GGUF file, folder, hub id) that cannot be found or read."""


class CacheError(MemoeError, ValueError):
    """A stored file that fails validation (unreadable, wrong key, hash or shape): a cache entry is rebuilt with a
    warning naming the file; a checkpoint or adapter is refused."""


class UnknownNameError(MemoeError, KeyError):
    """A name that is not registered (editor, architecture, model shape, study, preset)."""

    def __str__(self) -> str:  # KeyError would print the repr, quotes and all
        return str(self.args[0]) if self.args else ""


__all__ = ["AdapterError", "CacheError", "ConfigError", "DataError", "LayerError", "MemoeError", "MissingFileError",
           "ModelLoadError", "RecordError", "UnknownNameError"]
