"""Training bypass adapters with PyTorch Lightning (MEMoE; CoachHooK's gradient-trained variant).

- :mod:`memoe.training.data`: edit requests -> teacher-forced rows with their anchor spans (a DataModule);
- :mod:`memoe.training.module`: the LightningModule (target NLL + KL to the base + load balancing);
- :mod:`memoe.training.trainer`: Trainer options, pickle-free checkpoints and :func:`fit_adapter`.
"""

from memoe.training.data import EditDataModule, build_rows
from memoe.training.module import AdapterTrainingModule, TrainConfig
from memoe.training.trainer import SafetensorsCheckpointIO, TrainerOptions, fit_adapter

__all__ = ["AdapterTrainingModule", "EditDataModule", "SafetensorsCheckpointIO", "TrainConfig", "TrainerOptions",
           "build_rows", "fit_adapter"]
