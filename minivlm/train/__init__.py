"""Training: the loop (autocast, GradScaler, accumulation), schedule, checkpoints, DDP and ZeRO-1,
which parameters train (trainable.py), and the setup the stage scripts share (stage.py)."""
