"""Training: the loop (autocast, GradScaler, accumulation), schedule, checkpoints, DDP and ZeRO-1,
and the setup the stage scripts share."""
