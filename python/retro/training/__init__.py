"""Training: sequences with their neighbours, the loop, one step, checkpoints, FSDP, compilation."""
