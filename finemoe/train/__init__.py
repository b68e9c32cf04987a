"""Training: the loop, LR schedule, checkpoint/resume, metrics log, DDP and sampling."""
