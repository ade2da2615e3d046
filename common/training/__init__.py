"""Training mechanics shared by the stages: engines and data loaders, the DeepSpeed config, the optimiser,
the monitor, checkpoints and resume, the output-directory guard, and the supervised loop.
"""
