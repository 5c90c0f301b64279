"""The training loop (`trainer`): AdamW, schedule, precision, clipping, DDP, resume, progress, and the
evaluation it calls after each epoch. It imports every layer below it, never experiments.
"""
