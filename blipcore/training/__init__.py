"""The training loop (`trainer`): AdamW, schedule, precision, clipping, DDP, resume, progress, and the
evaluation it calls after each epoch; one optimiser step, its AdamW and schedule (`step`), the DDP helpers
(`distributed`) and what a run records of its code and machine (`environment`). It imports every layer below
it, never experiments.
"""
