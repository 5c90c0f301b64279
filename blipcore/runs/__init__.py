"""The run directory, the one contract between the trainer and the dashboard (`rundir`): every path in a run
folder, its weights and resumable state, the trainer lock, study folders. It imports the model and the bottom
layer, nothing of evaluation, training or experiments.
"""
