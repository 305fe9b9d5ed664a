"""The process and its devices: the mesh, joining a multi-process job, XLA flags, stop signals, device peak FLOP/s."""
