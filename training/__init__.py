"""train.py's machinery: the resumable sampler and loaders, the monitor and its curves,
checkpoints and exact resume, torchrun's process group, the shared-memory ring loader.
The knobs a researcher turns (lr schedule, margin ramp, optimiser) stay in train.py.
"""
