"""medfound: segmentation foundation models for medical images.

Three paths: MAE pretraining on unlabeled images then label-efficient adaptation, SAM with LoRA and
prompts, and in-context segmentation of new tasks. Data flows io -> data -> models -> train|infer ->
eval, with the CLI on top.
"""

__version__ = "0.1.0"
