"""Training: the loop, the jitted steps, the sharded state, the optimizer, checkpoints, config checks and what a
run reports."""
