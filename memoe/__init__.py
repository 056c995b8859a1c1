"""memoe: edit the factual knowledge of causal language models.

The public API in one place::

    from memoe import EditRequest, build_testbed, make_editor
    tb = build_testbed()                                   # or memoe.load_model("/path/to/Meta-Llama-3-8B")
    result = make_editor("rome").apply(tb.model, tb.tokenizer, [EditRequest("{} speaks", "Kalo Mira", "Welsh")])
    result.restore()                                       # the exact original model again
    memoe.attach(model, "runs/memoe-adapter")              # a trained MEMoE adapter beside a frozen base
"""

__version__ = "0.1.0"

from memoe.adapters import detach  # noqa: E402
from memoe.data import EditRecord, EditRequest, load_edit_dataset  # noqa: E402
from memoe.editors import REGISTRY, Editor, EditResult, attach, load_adapter, make_editor  # noqa: E402
from memoe.errors import MemoeError  # noqa: E402
from memoe.experiment import Experiment, load_experiment, run_experiment  # noqa: E402
from memoe.models import load_model, model_parts  # noqa: E402
from memoe.testbed import TestbedConfig, build_testbed  # noqa: E402
from memoe.trace import causal_trace  # noqa: E402

__all__ = [
    "REGISTRY", "EditRecord", "EditRequest", "EditResult", "Editor", "Experiment", "MemoeError", "TestbedConfig", "build_testbed", "causal_trace",
    "attach", "detach", "load_adapter", "load_edit_dataset", "load_experiment", "load_model", "make_editor", "model_parts",
    "run_experiment",
]
