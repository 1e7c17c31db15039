"""train.py's machinery: the Trainer and what a step needs besides its maths (trainer.py),
the monitor, curves and verification (monitor.py), checkpoints and exact resume
(train_checkpoints.py), torchrun's process group (distributed.py), and the shared-memory
ring loader that data_gen.build_loader offers (fast_loader.py). The knobs a researcher
turns (lr schedule, margin ramp, optimiser) stay in train.py; the sampler and the loader
builder in data_gen.py.
"""
