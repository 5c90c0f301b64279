"""Experiments built from training runs: studies (`study`: plan -> runs -> records -> report) and CapFilt
(`capfilt`: caption, filter, bootstrap a dataset). The top layer: it may import everything below it.
"""
