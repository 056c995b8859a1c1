"""The knowledge testbed: a small Llama that has learned the true facts of an edit dataset."""

from memoe.testbed.build import Testbed, TestbedConfig, build_testbed, format_report, storage_site

__all__ = ["Testbed", "TestbedConfig", "build_testbed", "format_report", "storage_site"]
