"""Evaluation: decoding strategies, the metric registry and its computations (with the diagnosis thresholds),
the evaluator of a checkpoint, scoring of outside captions, attention maps and Grad-CAM, and the run diagnosis.
It imports the model, data and runs layers, never training or experiments.
"""
